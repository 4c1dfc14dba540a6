"""tools/analyze_heads.py end to end: a demo checkpoint trained for a few steps on the demo
corpus and a tiny HARPE Hugging Face export, each analysed on real text into JSON and PNGs;
tensor parallelism agrees with one process; user errors exit with a message.

Run: pytest tests/e2e/test_analyze_heads.py            (add -m slow for the TP=2 comparison)
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

from megatron_harpe import parallel
from megatron_harpe.config import Config, from_dict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "analyze_heads.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GROUP_BASES = [100.0, 10000.0]  # one per k/v group; 2 query heads per group


def run_tool(*args: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, cwd=REPO, env=environment, timeout=600
    )


def _train(tree: dict) -> None:
    from megatron_harpe.training.loop import train

    train(from_dict(Config, tree))


@pytest.fixture(scope="module")
def demo_checkpoint(demo_data, tmp_path_factory) -> str:
    """A tiny HARPE model trained for 2 steps on the demo dataset."""
    root = tmp_path_factory.mktemp("heads_checkpoint")
    tree = {
        "model": dict(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=128,
            vocab_size=4096,
            max_position_embeddings=128,
        ),
        "position": {"type": "harpe", "bases": GROUP_BASES},
        "data": {"prefixes": [demo_data.prefix], "tokenizer": str(demo_data.tokenizer), "seq_length": 128},
        "train": {"micro_batch_size": 2, "global_batch_size": 2, "train_tokens": 2 * 2 * 128, "lr": 1e-2},
        "checkpoint": {"save": str(root / "ckpt")},
    }
    parallel.run_on_ranks(_train, 1, tree)
    return str(root / "ckpt")


def check_outputs(
    output_dir, layers: int, heads: int, bases: list[float], length: int, thresholds: list[int], documents: int
) -> dict:
    for name in ("distance_vs_base.png", "distance_heatmap.png"):
        with open(output_dir / name, "rb") as handle:
            assert handle.read(8) == PNG_MAGIC
        assert (output_dir / name).stat().st_size > 10_000
    assert not [name for name in os.listdir(output_dir) if name.endswith(".tmp")]
    summary = json.loads((output_dir / "head_analysis.json").read_text())
    assert (summary["layers"], summary["heads"], summary["bases"]) == (layers, heads, bases)
    assert summary["thresholds"] == thresholds and summary["documents"] == documents
    assert summary["queries_per_head"] == documents * (length - length // 2)
    assert len(summary["cells"]) == layers * heads
    for cell in summary["cells"]:
        distance = cell["mean_distance"]
        assert 0 < distance < length
        shares = [cell["share_beyond"][str(t)] for t in thresholds]
        assert all(0 <= share <= 1 for share in shares) and shares == sorted(shares, reverse=True)
        for threshold, share in zip(thresholds, shares):  # Markov: P(distance > t) <= E[distance] / t
            assert share <= distance / threshold + 1e-9
        assert 0 <= cell["first_token_mass"] <= 1
    assert summary["correlation"]["points"] == layers * heads
    return summary


def test_demo_checkpoint_to_json_and_plots(demo_checkpoint, demo_data, tmp_path):
    output = tmp_path / "heads"
    completed = run_tool(
        "--model",
        demo_checkpoint,
        "--documents",
        demo_data.prefix,
        "--length",
        "128",
        "--num-documents",
        "2",
        "--thresholds",
        "16,64",
        "--output-dir",
        str(output),
        "--max-block-elements",
        "4096",
        "--no-progress",
    )
    assert completed.returncode == 0, completed.stderr
    bases = [base for base in GROUP_BASES for _ in range(2)]
    summary = check_outputs(output, 2, 4, bases, 128, [16, 64], 2)
    assert summary["position"] == "harpe" and summary["unreachable_thresholds"] == []
    assert [row["base"] for row in summary["by_base"]] == GROUP_BASES
    assert "Spearman" in completed.stdout and "| 100 | 2 |" in completed.stdout


HF_BASES = [50.0, 50.0, 5e3, 5e5]


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory):
    """A tiny random HARPE export and a jsonl of three prose documents (text under "body")."""
    from megatron_harpe.eval.tasks.haystack import load_prose_sentences
    from megatron_harpe.eval.testing import save_tiny_harpe_llama, save_tiny_tokenizer

    root = tmp_path_factory.mktemp("heads_hf")
    model_dir = root / "hf"
    save_tiny_tokenizer(str(model_dir))
    save_tiny_harpe_llama(str(model_dir), bases=HF_BASES, seed=4)
    sentences = load_prose_sentences()
    documents = root / "docs.jsonl"
    documents.write_text(
        "".join(json.dumps({"body": " ".join(sentences[i : i + 60])}) + "\n" for i in (0, 60, 120)), encoding="utf-8"
    )
    return model_dir, documents


def test_hf_harpe_export_to_json_and_plots(hf_export, tmp_path, capsys):
    model_dir, documents = hf_export
    output = tmp_path / "heads"
    # in this process (no process group is involved): saves starting another interpreter
    exit_code = load_tool_main()(
        [
            "--model",
            str(model_dir),
            "--trust-remote-code",
            "--documents",
            str(documents),
            "--text-key",
            "body",
            "--length",
            "256",
            "--num-documents",
            "3",
            "--thresholds",
            "32,4k",
            "--output-dir",
            str(output),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr()
    assert exit_code == 0, printed.err
    summary = check_outputs(output, 2, 4, HF_BASES, 256, [32, 4096], 3)
    assert summary["unreachable_thresholds"] == [4096]
    assert all(cell["share_beyond"]["4096"] == 0 for cell in summary["cells"])
    assert "0 by construction" in printed.out and "Spearman" in printed.out


def _analyze_sharded(path: str, tensor_parallel: int, prefix: str) -> dict:
    from megatron_harpe.eval.analysis.heads import analyze_heads
    from megatron_harpe.eval.backends import load_backend
    from megatron_harpe.eval.perplexity import load_documents

    backend = load_backend(path, tensor_parallel=tensor_parallel)
    documents = load_documents(prefix, backend.tokenizer, max_documents=2, min_tokens=96)
    return analyze_heads(backend, documents, 96, thresholds=(8, 40)).to_dict()


@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_parallel_measures_the_same_heads(demo_checkpoint, demo_data):
    single = parallel.run_on_ranks(_analyze_sharded, 1, demo_checkpoint, 1, demo_data.prefix)[0]
    sharded = parallel.run_on_ranks(_analyze_sharded, 2, demo_checkpoint, 2, demo_data.prefix)
    for rank_result in sharded:
        for one, two in zip(single["cells"], rank_result["cells"]):
            assert (one["layer"], one["head"], one["base"]) == (two["layer"], two["head"], two["base"])
            assert two["mean_distance"] == pytest.approx(one["mean_distance"], rel=1e-4)
            assert two["share_beyond"] == pytest.approx(one["share_beyond"], rel=1e-4, abs=1e-6)


def load_tool_main():
    module = importlib.import_module("megatron_harpe.commands.analyze_heads")
    return module.main


def test_user_errors_exit_with_a_message(hf_export, tmp_path, capsys):
    main = load_tool_main()
    model_dir, documents = hf_export
    common = [
        "--model",
        str(model_dir),
        "--trust-remote-code",
        "--documents",
        str(documents),
        "--text-key",
        "body",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    assert main([*common, "--context-parallel", "2"]) == 2
    assert "--context-parallel 1" in capsys.readouterr().err
    assert main([*common, "--length", "64", "--min-query-position", "64"]) == 2
    assert "--min-query-position 64 must lie in 0..63" in capsys.readouterr().err
    assert main([*common, "--length", "100000"]) == 2
    assert "at least 100000 tokens" in capsys.readouterr().err
    assert main([*common[:3], "--documents", str(documents), "--length", "64"]) == 2
    assert "'text' field" in capsys.readouterr().err
    assert main(["--model", "oracle", "--documents", str(documents)]) == 2
    assert "model directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main([*common, "--thresholds", "4x"])
