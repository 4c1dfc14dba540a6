"""The replication's open question (issue 19): does HARPE catch up with multi-stage ABF as the
adaptation budget and the number of heads grow?

    python experiments/replicate/sweep.py --output experiments/replicate/sweep --jobs 2    # full sweep
    python experiments/replicate/sweep.py --output /tmp/sweep_smoke --smoke --jobs 0        # < 1 min
    python experiments/replicate/sweep.py --output experiments/replicate/sweep_wide --heads 8 16 \
        --heads-hidden 256 --heads-round-tokens 1500000 --heads-only --jobs 2    # 8 against 16 heads, 256 wide

The same entry points and worker processes as run.py (`tools/prepare_data.py`,
`pretrain_harpe.py`, `tools/evaluate.py`), over a grid:

1. data: the synthetic corpora of corpus.py; the base corpus uses the grammar of the
   evaluation prompts (`Sweep.base_grammar`): each value is queried once, so the answer is
   only in its needle (run.py's corpus re-asks keys, and copying an earlier answer to the same
   query stands in for the lookup: base models reached a training loss of 0.92 per answer
   digit yet 1% exact match on the prompts), with denser needles, so distractors abound;
2. base: per heads setting and seed, a base model trained in rounds of `base_round_tokens`,
   each round from the previous weights and evaluated; a seed stops when its exact match at
   the base length reaches `base_gate` (80%) or after `base_max_rounds`. The tokens each seed
   took go into the report;
3. extend+eval: harpe, abf and abf_multistage (methods.py) from every base model: for every
   adaptation budget at `heads[0]` heads (hidden size `scale.hidden_size`), and at `heads_budget`
   for every heads setting at the comparison's width (`heads_hidden`), each model evaluated
   right after it is trained (with --heads-only, the heads comparison alone). A base model's
   extensions start in the first base round after it passed the gate, beside the seeds still
   training;
4. report (sweep_report.py): exact match and digit accuracy vs budget, paired differences,
   the heads comparison and the trend, in --output.

A job whose marker exists is skipped, so an interrupted sweep resumes where it stopped; each
finished job prints a progress line with the time left. The scale is recorded in scale.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import write_answer_mask, write_corpus  # noqa: E402
from methods import Scale, base_config, extension_config  # noqa: E402
from run import MODEL_VOCAB_MULTIPLE, Runner, start_runner, train_then_evaluate  # noqa: E402  (first: it quiets megatron-core)
from sweep_report import write_sweep_report  # noqa: E402

from megatron_harpe.eval.tasks.synthetic_kv import vocabulary, write_tokenizer  # noqa: E402

SWEEP_METHODS = ("harpe", "abf", "abf_multistage")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The grid and its scale (the full sweep and --smoke differ only here)."""

    scale: Scale
    budgets: tuple[int, ...]
    """Adaptation tokens per extension run of the budget sweep: heads[0] heads at scale.hidden_size."""
    heads: tuple[int, ...]
    """Heads per layer compared at equal width (`heads_hidden`); heads[0] also gets the budget sweep."""
    heads_budget: int
    """The budget of the heads comparison."""
    base_round_tokens: int
    base_max_rounds: int
    base_gate: float
    """Exact match (%) at the base length that ends a seed's base training."""
    base_grammar: dict[str, Any]
    """training_document's mean_gap, query_share and fresh_queries for the base corpus."""
    methods: tuple[str, ...] = SWEEP_METHODS
    heads_hidden: int = 0
    """Hidden size of the heads comparison (0: scale.hidden_size). A wider one keeps the heads
    of every setting large enough to learn the lookup (16 heads of 8 dimensions did not)."""
    heads_round_tokens: int = 0
    """Tokens per base round of the models wider than scale.hidden_size (0: base_round_tokens)."""
    heads_only: bool = False
    """Only the heads comparison: no budget sweep, no model at scale.hidden_size unless compared."""

    @property
    def comparison_hidden(self) -> int:
        return self.heads_hidden or self.scale.hidden_size

    def models(self) -> list[tuple[int, int]]:
        """(hidden, heads) of every model shape: the budget sweep's first (unless heads_only), then the
        heads comparison's."""
        shapes = [] if self.heads_only else [(self.scale.hidden_size, self.heads[0])]
        return shapes + [
            (self.comparison_hidden, heads) for heads in self.heads if (self.comparison_hidden, heads) not in shapes
        ]

    def runs(self) -> list[tuple[int, int, int, str, int]]:
        """(hidden, heads, budget, method, seed) of every extension run."""
        grid = [] if self.heads_only else [(self.scale.hidden_size, self.heads[0], budget) for budget in self.budgets]
        grid += [
            (self.comparison_hidden, heads, self.heads_budget)
            for heads in self.heads
            if (self.comparison_hidden, heads, self.heads_budget) not in grid
        ]
        return [
            (hidden, heads, budget, method, seed)
            for hidden, heads, budget in grid
            for seed in self.scale.seeds
            for method in self.methods
        ]

    def scale_of(self, hidden: int, heads: int, **changes: Any) -> Scale:
        """The scale of one model shape (the feed-forward size grows with the width)."""
        return dataclasses.replace(
            self.scale,
            hidden_size=hidden,
            num_attention_heads=heads,
            ffn_hidden_size=self.scale.ffn_hidden_size * hidden // self.scale.hidden_size,
            **changes,
        )

    def round_tokens(self, hidden: int) -> int:
        """Tokens per base round of a model `hidden` wide."""
        wider = hidden != self.scale.hidden_size and self.heads_round_tokens
        return self.heads_round_tokens if wider else self.base_round_tokens

    def model_name(self, hidden: int, heads: int) -> str:
        return f"h{heads}" if hidden == self.scale.hidden_size else f"w{hidden}_h{heads}"

    def run_name(self, hidden: int, heads: int, budget: int, method: str, seed: int) -> str:
        return f"{self.model_name(hidden, heads)}_{method}_{budget // 1000}k_seed{seed}"

    def validate(self) -> None:
        self.scale.validate()
        if len(self.budgets) < 1 or sorted(self.budgets) != list(self.budgets):
            raise ValueError(f"budgets must be given in increasing order, got {self.budgets}")
        if min(self.heads) < 1 or self.heads_hidden < 0 or self.heads_round_tokens < 0:
            raise ValueError("heads must be at least 1, heads_hidden and heads_round_tokens positive (or 0: default)")
        if any(hidden % heads or hidden // heads % 2 for hidden, heads in self.models()):
            shapes = ", ".join(f"hidden {hidden} / {heads} heads" for hidden, heads in self.models())
            raise ValueError(
                f"every heads setting must split its hidden size into heads of an even size (rotary pairs): {shapes}"
            )
        if not 0 < self.base_gate <= 100 or self.base_max_rounds < 1:
            raise ValueError("base_gate must be in (0, 100] and base_max_rounds >= 1")


FULL_SWEEP = Sweep(
    scale=Scale(
        base_length=64,
        target_length=512,
        eval_lengths=(64, 128, 256, 512, 1024),
        eval_samples=100,
        base_tokens=3_000_000,
        base_rounds=1,
        later_round_tokens=3_000_000,
        base_batch=16,
        base_lr=1e-3,
        extension_batch=4,
    ),
    budgets=(150_000, 500_000, 1_500_000),
    heads=(8, 4),
    heads_budget=150_000,
    base_round_tokens=3_000_000,
    base_max_rounds=3,
    base_gate=80.0,
    base_grammar={"mean_gap": 1.5, "query_share": 0.4, "fresh_queries": True},
)
SMOKE_SWEEP = Sweep(
    scale=Scale(
        base_length=64,
        target_length=256,
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        base_tokens=8192,
        later_round_tokens=8192,
        base_rounds=1,
        extension_tokens=4096,
        base_batch=8,
        extension_batch=2,
        seeds=(1, 2),
        eval_lengths=(64, 256),
        eval_samples=3,
    ),
    budgets=(4096, 8192),
    heads=(4, 8),
    heads_budget=4096,
    heads_hidden=64,
    heads_round_tokens=4096,
    base_round_tokens=8192,
    base_max_rounds=2,
    base_gate=100.0,
    base_grammar={"mean_gap": 1.5, "query_share": 0.4, "fresh_queries": True},
)


def prepare_sweep_data(runner: Runner, sweep: Sweep) -> dict[str, Any]:
    """Tokenizer and the two corpora: the base one in the sweep's grammar, the extension one
    large enough for the largest budget twice over (seeds read it in different orders)."""
    scale, data_dir = sweep.scale, runner.workdir / "data"
    tokenizer = write_tokenizer(data_dir / "tokenizer.json")
    base_tokens = max(sweep.round_tokens(hidden) for hidden, _ in sweep.models()) * sweep.base_max_rounds
    base_prefix, base_command = write_corpus(
        data_dir, "base", base_tokens, scale.base_length, 0.0, 0, tokenizer, grammar=sweep.base_grammar
    )
    extension_prefix, extension_command = write_corpus(
        data_dir,
        "extension",
        max(sweep.budgets + (sweep.heads_budget,)) * 2,
        scale.target_length,
        scale.short_share,
        1,
        tokenizer,
    )
    runner.run_all(
        "data",
        [
            [("tokenize_base", base_command, data_dir / "base.DONE")],
            [("tokenize_extension", extension_command, data_dir / "extension.DONE")],
        ],
    )
    return {
        "tokenizer": str(tokenizer),
        "base_prefix": str(base_prefix),
        "extension_prefix": str(extension_prefix),
        "base_mask": str(write_answer_mask(base_prefix)),
        "extension_mask": str(write_answer_mask(extension_prefix)),
        "vocab_size": -(-len(vocabulary()) // MODEL_VOCAB_MULTIPLE) * MODEL_VOCAB_MULTIPLE,
    }


def exact_match_at(eval_dir: Path, length: int) -> float | None:
    results = eval_dir / "results.json"
    if not results.exists():
        return None
    return float(json.loads(results.read_text())["tasks"]["synthetic_kv"][str(length)]["score"])


def base_round_chains(
    runner: Runner, sweep: Sweep, data: dict[str, Any], output: Path, state: dict, round_index: int
) -> tuple[list, dict[str, float]]:
    """The train+eval chains of one base round for every base model still below the gate."""
    workdir, chains, costs = runner.workdir, [], {}
    for (hidden, heads, seed), entry in state.items():
        if entry["passed"]:
            continue
        name = f"{sweep.model_name(hidden, heads)}_base_seed{seed}" + (
            f"_round{round_index + 1}" if round_index else ""
        )
        checkpoint = workdir / "checkpoints" / name
        tokens = sweep.round_tokens(hidden)
        round_scale = sweep.scale_of(hidden, heads, base_tokens=tokens, later_round_tokens=tokens)
        tree = base_config(
            round_scale, data, str(checkpoint), seed=100 * seed + round_index, pretrained=entry.get("checkpoint")
        )
        chain = train_then_evaluate(runner, output, name, tree, sweep.scale)
        chains.append(chain)
        costs[name] = tokens * hidden / sweep.scale.hidden_size  # time grows about with width
        costs[f"eval_{name}"] = sweep.base_round_tokens / 20
        entry.update(
            checkpoint=str(checkpoint),
            eval=chain[-1][2].parent,
            rounds=round_index + 1,  # eval marker: in its folder
            tokens=entry.get("tokens", 0) + tokens,
        )
    return chains, costs


def extension_chains(
    runner: Runner, sweep: Sweep, data: dict[str, Any], output: Path, bases: dict, keys: set[tuple[int, int, int]]
) -> tuple[list, dict[str, float]]:
    """The extend+eval chains of every run whose base model, (hidden, heads, seed), is in `keys`."""
    workdir, chains, costs = runner.workdir, [], {}
    for hidden, heads, budget, method, seed in sweep.runs():
        if (hidden, heads, seed) not in keys:
            continue
        name = sweep.run_name(hidden, heads, budget, method, seed)
        run_scale = sweep.scale_of(hidden, heads, extension_tokens=budget)
        tree = extension_config(
            method, run_scale, data, bases[hidden, heads, seed]["checkpoint"], str(workdir / "checkpoints" / name), seed
        )
        chains.append(train_then_evaluate(runner, output, name, tree, sweep.scale))
        # a token at the target length costs about twice one at the base length; time grows about with width
        costs[name] = budget * 2 * hidden / sweep.scale.hidden_size
        costs[f"eval_{name}"] = sweep.base_round_tokens / 20
    return chains, costs


def train_and_extend(runner: Runner, sweep: Sweep, data: dict[str, Any], output: Path) -> dict[tuple, dict]:
    """Base models per (hidden, heads, seed) in rounds until each passes the gate, then every
    extension run from them; returns {(hidden, heads, seed): {"checkpoint", "eval", "rounds",
    "tokens", "exact_match", "passed"}}.

    A round's phase also runs the extensions of the base models that passed before it, so the
    workers stay busy while a few seeds take another round. A base model still below the gate
    after base_max_rounds is extended all the same (the report marks it)."""
    scale = sweep.scale
    state = {
        (hidden, heads, seed): {"rounds": 0, "passed": False}
        for hidden, heads in sweep.models()
        for seed in scale.seeds
    }
    extended: set[tuple[int, int, int]] = set()
    for round_index in range(sweep.base_max_rounds):
        chains, costs = base_round_chains(runner, sweep, data, output, state, round_index)
        if not chains:
            break
        ready = {key for key, entry in state.items() if entry["passed"]} - extended
        more, more_costs = extension_chains(runner, sweep, data, output, state, ready)
        extended |= ready
        beside = f" + extensions of {len(ready)} base model{'s' * (len(ready) > 1)}" if ready else ""
        runner.run_all(f"base round {round_index + 1}{beside}", chains + more, {**costs, **more_costs})
        for (hidden, heads, seed), entry in state.items():
            if not entry["passed"]:
                entry["exact_match"] = exact_match_at(entry["eval"], scale.base_length)
                entry["passed"] = (entry["exact_match"] or 0.0) >= sweep.base_gate
                runner.progress(
                    f"base: hidden {hidden}, {heads} heads, seed {seed}: {entry['exact_match']:.1f}% exact match at "
                    f"{scale.base_length} after {entry['tokens']:,} tokens"
                    + ("" if entry["passed"] else f" (below the {sweep.base_gate:.0f}% gate)")
                )
    chains, costs = extension_chains(runner, sweep, data, output, state, set(state) - extended)
    runner.run_all("extend+eval", chains, costs)
    return state


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path, help="results folder (small files only)")
    parser.add_argument("--workdir", type=Path, default=None, help="data, checkpoints, logs (default runs/sweep)")
    parser.add_argument("--smoke", action="store_true", help="a tiny grid of tiny models, a few steps each")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="worker processes running in parallel (one core each); 0 runs everything in this process",
    )
    parser.add_argument(
        "--heads",
        type=int,
        nargs="+",
        default=None,
        help="heads per layer to compare, the first also gets the budget sweep (default: 8 4)",
    )
    parser.add_argument(
        "--heads-hidden",
        type=int,
        default=None,
        help="hidden size of the heads comparison, e.g. 256 for 8 against 16 heads of 32 and 16 "
        "dimensions (default: the budget sweep's 128)",
    )
    parser.add_argument(
        "--heads-round-tokens",
        type=int,
        default=None,
        help="tokens per base round of the models wider than the budget sweep's",
    )
    parser.add_argument(
        "--heads-only", action="store_true", help="run only the heads comparison (its report has no budget tables)"
    )
    return parser


def sweep_from_args(args: argparse.Namespace) -> Sweep:
    """FULL_SWEEP (or SMOKE_SWEEP) with the heads comparison the options ask for; ValueError if it
    cannot work."""
    changes = {
        "heads": tuple(args.heads) if args.heads else None,
        "heads_hidden": args.heads_hidden,
        "heads_round_tokens": args.heads_round_tokens,
        "heads_only": args.heads_only or None,
    }
    sweep = dataclasses.replace(
        SMOKE_SWEEP if args.smoke else FULL_SWEEP,
        **{name: value for name, value in changes.items() if value is not None},
    )
    sweep.validate()
    return sweep


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sweep = sweep_from_args(args)
    except ValueError as error:
        parser.error(str(error))  # one line and exit code 2
    repo = Path(__file__).resolve().parents[2]
    workdir = (args.workdir or repo / "runs" / ("sweep_smoke" if args.smoke else "sweep")).resolve()
    runner = start_runner(args.output, workdir, args.jobs, "sweep.py", sys.argv[1:] if argv is None else argv)
    output = runner.output
    (output / "scale.json").write_text(
        json.dumps(
            {
                **dataclasses.asdict(sweep),
                "models": sweep.models(),
                "ratio": sweep.scale.ratio,
                "runs": len(sweep.runs()),
            },
            indent=2,
        )
    )

    runner.progress(f"data: tokenizer and synthetic corpora; {len(sweep.runs())} extension runs planned")
    data = prepare_sweep_data(runner, sweep)
    bases = train_and_extend(runner, sweep, data, output)
    paths = write_sweep_report(workdir / "eval", output, sweep, bases)
    runner.progress("report: " + ", ".join(str(path) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
