"""The CPU-scale replication of HARPE's claim (issue 9), run through the framework's own entry points.

    python experiments/replicate/run.py --output experiments/replicate/results          # full run
    python experiments/replicate/run.py --output /tmp/replicate_smoke --smoke            # ~1 minute

Phases (each prints a progress line; a phase whose outputs exist is skipped, so an
interrupted run resumes where it stopped):

1. data: the word-level tokenizer and two synthetic key/value corpora (base length and
   target length, see corpus.py), tokenized by `tools/prepare_data.py tokenize`;
2. base: `pretrain_harpe.py` trains a tiny model per seed at the base length with RoPE base
   10000 (optionally in rounds, each from the previous weights);
3. extend: `pretrain_harpe.py` continues each seed's base model to the 8x target length with
   every method of methods.py (HARPE, ABF, multi-stage ABF, PI, no change) at equal tokens;
4. eval: `tools/evaluate.py --task synthetic_kv` scores the base model and every extended
   model at lengths from the base length to twice the target (teacher forcing), and
   `--task ppl` their perplexity on held-out base-length documents, each model right after it
   is trained, so an interrupted run keeps the results it has;
5. report: results.md (mean and spread over seeds per method and length, accuracy by
   depth, retention at the base length: exact match and held-out perplexity before and after
   extension), results.png and commands.md (every command, in order) in --output.

Checkpoints, datasets and logs go to --workdir (default runs/replicate, not committed); the
output folder holds only small result files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron_harpe.cli import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core is imported below: our progress lines, not its warnings

import yaml  # noqa: E402
from corpus import write_answer_mask, write_corpus, write_heldout  # noqa: E402
from methods import ABLATIONS, FULL, METHODS, SMOKE, Scale, base_config, extension_config  # noqa: E402
from report import write_report  # noqa: E402
from worker import run_job  # noqa: E402

from megatron_harpe.eval.tasks.synthetic_kv import vocabulary, write_tokenizer  # noqa: E402

MODEL_VOCAB_MULTIPLE = 128


Job = tuple[str, list[str], Path]  # name, command, marker file written when it succeeded


class Runner:
    """Runs commands (in parallel up to `jobs`), logs them to commands.md, prints progress."""

    def __init__(self, output: Path, workdir: Path, jobs: int) -> None:
        self.output, self.workdir, self.jobs = output, workdir, jobs
        self.commands = output / "commands.md"
        self.started = time.time()
        self.scripts: dict = {}  # entry-point modules already imported (jobs=0)
        (workdir / "logs").mkdir(parents=True, exist_ok=True)

    def progress(self, message: str) -> None:
        print(f"[replicate {time.strftime('%H:%M:%S')} +{time.time() - self.started:6.0f}s] {message}", flush=True)

    def record(self, command: list[str]) -> None:
        parts = ["python" if part == sys.executable else part for part in command]
        shown = " ".join(os.path.relpath(part, REPO) if part.startswith(str(REPO)) else part for part in parts)
        with self.commands.open("a") as handle:
            handle.write(f"    {shown}\n")

    def run_all(self, phase: str, chains: list[list[Job]], costs: dict[str, float] | None = None) -> None:
        """Run the (name, command, done-marker) jobs whose marker is missing, spread over `jobs`
        worker processes (worker.py: one import of torch/megatron per worker, not per run).
        The jobs of one chain (e.g. train a model, then evaluate it) run in order in one worker.
        `costs` (job name -> relative cost, e.g. tokens) weights the time-left estimate; without
        it every job counts the same. Raise if any fails."""
        pending_chains = [[job for job in chain if not job[2].exists()] for chain in chains]
        pending_chains = [chain for chain in pending_chains if chain]
        pending = [job for chain in pending_chains for job in chain]
        total = sum(len(chain) for chain in chains)
        self.progress(f"{phase}: {total - len(pending)}/{total} already done, running {len(pending)}")
        if not pending:
            return
        for _, command, _ in pending:
            self.record(command)
        if self.jobs == 0:  # everything in this process: one import of torch/megatron for the whole run
            for name, command, marker in pending:
                began = time.time()
                job = {
                    "name": name,
                    "command": command,
                    "marker": str(marker),
                    "log": str(self.workdir / "logs" / f"{name}.log"),
                }
                if not run_job(job, self.scripts):
                    raise RuntimeError(f"{phase}: {name} failed; see {job['log']}")
                self.progress(f"{phase}: done {name} {time.time() - began:.0f}s")
            return
        worker_count = min(self.jobs, len(pending_chains))
        threads = str(max(1, (os.cpu_count() or 2) // worker_count))  # the cores shared among the workers
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", threads), PYTHONWARNINGS="ignore")
        workers = []
        for index, share_chains in enumerate(balance(pending_chains, worker_count, costs or {})):
            share = [
                {
                    "name": name,
                    "command": command,
                    "marker": str(marker),
                    "log": str(self.workdir / "logs" / f"{name}.log"),
                }
                for chain in share_chains
                for name, command, marker in chain
            ]
            jobs_file = self.workdir / "logs" / f"{phase}_worker{index}.json"
            jobs_file.write_text(json.dumps(share, indent=1))
            workers.append(
                subprocess.Popen(
                    [sys.executable, str(Path(__file__).parent / "worker.py"), str(jobs_file)],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        finished, phase_started = [0], time.time()
        cost = {name: (costs or {}).get(name, 1.0) for name, _, _ in pending}
        cost_done, cost_total = [0.0], sum(cost.values())

        def relay(worker: subprocess.Popen) -> None:
            assert worker.stdout is not None
            for line in worker.stdout:
                finished[0] += 1
                words = line.split()
                cost_done[0] += cost.get(words[1], 1.0) if len(words) > 1 else 1.0
                done, left = finished[0], len(pending) - finished[0]
                # a rough guide: the cost left at the pace so far (parallel workers finish out of order)
                eta = (time.time() - phase_started) / max(cost_done[0], 1e-9) * max(cost_total - cost_done[0], 0.0)
                bar = "#" * (20 * done // len(pending))
                self.progress(
                    f"{phase}: [{bar:<20}] {done}/{len(pending)} {line.strip()}"
                    + (f", about {eta / 60:.0f} min left" if left else "")
                )

        relays = [threading.Thread(target=relay, args=(worker,)) for worker in workers]
        for thread in relays:
            thread.start()
        for thread in relays:
            thread.join()
        failed = [job[0] for job in pending if not job[2].exists()]
        if any(worker.wait() for worker in workers) or failed:
            raise RuntimeError(f"{phase}: {', '.join(failed)} failed; see the logs in {self.workdir / 'logs'}")


def balance(chains: list[list[Job]], workers: int, costs: dict[str, float]) -> list[list[list[Job]]]:
    """Chains shared among `workers` so their total costs come out even: the costliest chain
    first, each to the least loaded worker (a worker's chains keep their given order)."""
    chain_cost = [sum(costs.get(name, 1.0) for name, _, _ in chain) for chain in chains]
    loads, shares = [0.0] * workers, [[] for _ in range(workers)]
    for index in sorted(range(len(chains)), key=lambda i: -chain_cost[i]):
        lightest = loads.index(min(loads))
        loads[lightest] += chain_cost[index]
        shares[lightest].append(index)
    return [[chains[i] for i in sorted(share)] for share in shares]


def start_runner(output: Path, workdir: Path, jobs: int, script: str, argv: list[str]) -> Runner:
    """A Runner writing into `output` (created), with this invocation recorded in commands.md."""
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    runner = Runner(output, workdir, jobs)
    with runner.commands.open("a") as handle:
        handle.write(
            f"\n## run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
            f"    python experiments/replicate/{script} {' '.join(argv)}\n\n"
        )
    return runner


class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # write repeated blocks out in full (no &id001 anchors)
        return True


def write_yaml(tree: dict, path: Path) -> Path:
    from megatron_harpe import files

    return files.write_text(path, yaml.dump(tree, Dumper=_PlainDumper, sort_keys=False))


def prepare_data(runner: Runner, scale: Scale) -> dict:
    """Tokenizer, corpora (jsonl) and their tokenization by tools/prepare_data.py."""
    data_dir = runner.workdir / "data"
    tokenizer = write_tokenizer(data_dir / "tokenizer.json")
    base_prefix, base_command = write_corpus(data_dir, "base", scale.base_tokens, scale.base_length, 0.0, 0, tokenizer)
    extension_prefix, extension_command = write_corpus(  # twice the tokens one run uses: seeds see different halves
        data_dir, "extension", scale.extension_tokens * 2, scale.target_length, scale.short_share, 1, tokenizer
    )
    runner.run_all(
        "data",
        [
            [("tokenize_base", base_command, data_dir / "base.DONE")],
            [("tokenize_extension", extension_command, data_dir / "extension.DONE")],
        ],
    )
    vocab = len(vocabulary())
    heldout = write_heldout(data_dir, scale.heldout_documents, scale.base_length, seed=7919)
    return {
        "tokenizer": str(tokenizer),
        "base_prefix": str(base_prefix),
        "extension_prefix": str(extension_prefix),
        "heldout": str(heldout),
        "base_mask": str(write_answer_mask(base_prefix)),
        "extension_mask": str(write_answer_mask(extension_prefix)),
        "vocab_size": -(-vocab // MODEL_VOCAB_MULTIPLE) * MODEL_VOCAB_MULTIPLE,
    }


def train_command(config_path: Path, processes: int = 1) -> list[str]:
    if processes > 1:
        return [
            "torchrun",
            "--nproc-per-node",
            str(processes),
            str(REPO / "pretrain_harpe.py"),
            "--config",
            str(config_path),
        ]
    return [sys.executable, str(REPO / "pretrain_harpe.py"), "--config", str(config_path)]


def eval_command(checkpoint: Path, out_dir: Path, scale: Scale) -> list[str]:
    return [
        sys.executable,
        str(REPO / "tools" / "evaluate.py"),
        "--model",
        str(checkpoint),
        "--task",
        "synthetic_kv",
        "--lengths",
        ",".join(str(length) for length in scale.eval_lengths),
        "--samples",
        str(scale.eval_samples),
        "--scoring",
        "teacher_forcing",
        "--seed",
        "42",
        "--output-dir",
        str(out_dir),
        "--save-predictions",
        "--overwrite",
        "--no-progress",
    ]


def perplexity_command(checkpoint: Path, out_dir: Path, scale: Scale, heldout: str) -> list[str]:
    """Held-out perplexity at the base length (one window per document), for the retention table."""
    return [
        sys.executable,
        str(REPO / "tools" / "evaluate.py"),
        "--model",
        str(checkpoint),
        "--task",
        "ppl",
        "--lengths",
        str(scale.base_length),
        "--ppl-data",
        heldout,
        "--ppl-max-documents",
        str(scale.heldout_documents),
        "--output-dir",
        str(out_dir),
        "--overwrite",
        "--no-progress",
    ]


def evaluation_jobs(runner: Runner, name: str, checkpoint: Path, scale: Scale, data: dict | None) -> list[Job]:
    """Retrieval at every length into <workdir>/eval/<name>, then (with held-out data) perplexity
    at the base length into <workdir>/eval/<name>_ppl (its own marker: a run that predates it
    adds just that)."""
    eval_dir, ppl_dir = runner.workdir / "eval" / name, runner.workdir / "eval" / f"{name}_ppl"
    jobs: list[Job] = [(f"eval_{name}", eval_command(checkpoint, eval_dir, scale), eval_dir / "DONE")]
    if data and data.get("heldout"):
        jobs.append((f"ppl_{name}", perplexity_command(checkpoint, ppl_dir, scale, data["heldout"]), ppl_dir / "DONE"))
    return jobs


def train_then_evaluate(
    runner: Runner, output: Path, name: str, tree: dict, scale: Scale, data: dict | None = None
) -> list[Job]:
    """The jobs that train `tree` (config in <output>/configs/<name>.yaml, weights in its
    checkpoint.save) and then evaluate that checkpoint (`evaluation_jobs`)."""
    checkpoint = Path(tree["checkpoint"]["save"])
    return [
        (name, train_command(write_yaml(tree, output / "configs" / f"{name}.yaml")), checkpoint / "DONE"),
        *evaluation_jobs(runner, name, checkpoint, scale, data),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path, help="results folder (small files only)")
    parser.add_argument("--workdir", type=Path, default=None, help="data, checkpoints, logs (default runs/replicate)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one seed, a few steps")
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="number of seeds, each a base model and its extensions (default 3; smoke 1)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="worker processes running in parallel (one core each); 0 runs everything in this process",
    )
    parser.add_argument("--extension-tokens", type=int, default=None, help="tokens per extension run (scale down)")
    parser.add_argument("--eval-samples", type=int, default=None, help="samples per length and model (scale down)")
    parser.add_argument("--eval-lengths", default=None, help="comma-separated evaluation lengths")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS + ABLATIONS)
    )
    args = parser.parse_args(argv)
    scale = SMOKE if args.smoke else FULL
    changes: dict = {}
    if args.seeds is not None:
        changes["seeds"] = tuple(range(1, args.seeds + 1))
    if args.extension_tokens is not None:
        changes["extension_tokens"] = args.extension_tokens
    if args.eval_samples is not None:
        changes["eval_samples"] = args.eval_samples
    if args.eval_lengths is not None:
        changes["eval_lengths"] = tuple(int(part) for part in args.eval_lengths.split(",") if part.strip())
    scale = Scale(**{**scale.__dict__, **changes})
    scale.validate()
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = sorted(set(methods) - set(METHODS + ABLATIONS))
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS + ABLATIONS)}")
    workdir = (args.workdir or REPO / "runs" / ("replicate_smoke" if args.smoke else "replicate")).resolve()
    runner = start_runner(args.output, workdir, args.jobs, "run.py", sys.argv[1:] if argv is None else argv)
    output = runner.output

    # 1. data
    runner.progress("data: tokenizer and synthetic corpora")
    data = prepare_data(runner, scale)

    # 2. one base model per seed at the base length (then evaluated): the spread over seeds
    #    covers pretraining as well as extension
    base_chains, base_dirs = [], {}
    for seed in scale.seeds:
        chain, previous = [], None
        for round_index in range(scale.base_rounds):
            name = f"base_seed{seed}" if round_index == 0 else f"base_seed{seed}_round{round_index + 1}"
            base_dir = workdir / "checkpoints" / name
            tree = base_config(scale, data, str(base_dir), seed=100 * seed + round_index, pretrained=previous)
            command = train_command(write_yaml(tree, output / "configs" / f"{name}.yaml"), scale.base_processes)
            chain.append((name, command, base_dir / "DONE"))
            previous = str(base_dir)
        chain += evaluation_jobs(runner, f"base_seed{seed}", base_dir, scale, data)
        base_chains.append(chain)
        base_dirs[seed] = base_dir
    runner.run_all("base", base_chains)

    # 3+4. extension with every method and seed (from that seed's base model), each model
    #      evaluated as soon as it is trained
    runs = [(method, seed) for seed in scale.seeds for method in methods]
    chains = []
    for method, seed in runs:
        name = f"{method}_seed{seed}"
        checkpoint = workdir / "checkpoints" / name
        tree = extension_config(method, scale, data, str(base_dirs[seed]), str(checkpoint), seed)
        chains.append(train_then_evaluate(runner, output, name, tree, scale, data))
    runner.run_all("extend+eval", chains)

    # 5. report
    (output / "scale.json").write_text(json.dumps({**scale.__dict__, "ratio": scale.ratio}, indent=2))
    paths = write_report(workdir / "eval", output, scale, methods, runs, runner.progress)
    runner.progress("report: " + ", ".join(str(path) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
