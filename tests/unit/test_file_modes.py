"""Files written for users get their mode from the umask, like a plain open(): teammates on a
shared cluster can read results, plots, selected bases, exports, datasets and checkpoints.

    python -m pytest tests/unit/test_file_modes.py -q

Each writer runs under umask 0o022 and 0o077; every file (and directory) it leaves is compared
with a sibling made by plain open() / mkdir() under the same umask. Private temporary files
(tempfile.mkstemp: 0600, safetensors' save_file: 0600) renamed into place would fail this.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_harpe import files, parallel

REPO = Path(__file__).resolve().parents[2]
UMASKS = (0o022, 0o077)


@pytest.fixture(params=UMASKS, ids=lambda mask: f"umask{mask:03o}")
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _plain_modes(directory: Path) -> tuple[int, int]:
    """The modes of a file and a directory made the plain way under the current umask."""
    with open(directory / "plain-sibling", "w") as handle:
        handle.write("x")
    (directory / "plain-sibling-dir").mkdir()
    modes = (
        stat.S_IMODE(os.stat(directory / "plain-sibling").st_mode),
        stat.S_IMODE(os.stat(directory / "plain-sibling-dir").st_mode),
    )
    os.remove(directory / "plain-sibling")
    os.rmdir(directory / "plain-sibling-dir")
    return modes


def _assert_plain_modes(root: Path, expect_files: list[str]) -> None:
    file_mode, directory_mode = _plain_modes(root)
    seen = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            continue
        seen[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    for name in expect_files:
        assert name in seen, f"{name} was not written (found {sorted(seen)})"
    wrong = {
        name: oct(mode)
        for name, mode in seen.items()
        if mode != (directory_mode if (root / name).is_dir() else file_mode)
    }
    assert not wrong, f"modes differ from plain open() ({oct(file_mode)}) / mkdir() ({oct(directory_mode)}): {wrong}"
    assert not [name for name in seen if ".tmp" in name or ".incomplete" in name], sorted(seen)


def test_helper_modes(umask, tmp_path):
    files.write_text(tmp_path / "a.txt", "a")
    files.write_json(tmp_path / "b.json", {"b": 1})
    with files.atomic_path(tmp_path / "c.bin") as temporary:  # a writer that makes the file private
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    with files.atomic_directory(tmp_path / "d") as staging:
        (staging / "sub").mkdir(mode=0o700)
        (staging / "sub" / "e").write_text("e")
    assert files.file_mode() == 0o666 & ~umask
    _assert_plain_modes(tmp_path, ["a.txt", "b.json", "c.bin", "d", "d/sub", "d/sub/e"])


def test_evaluation_results_report_and_plots(umask, tmp_path):
    from megatron_harpe.eval.backends.hf import HFTokenizer
    from megatron_harpe.eval.backends.synthetic import OracleBackend
    from megatron_harpe.eval.report import write_report
    from megatron_harpe.eval.suite import run_eval_suite
    from megatron_harpe.eval.testing import save_tiny_tokenizer

    save_tiny_tokenizer(str(tmp_path / "tokenizer"))
    oracle = OracleBackend(HFTokenizer.from_pretrained(str(tmp_path / "tokenizer")))
    document = oracle.tokenizer.encode("The grass is green. " * 100)
    results = run_eval_suite(
        oracle,
        ["passkey", "ppl"],
        [256],
        samples=1,
        seed=0,
        ppl_documents=[document],
        keep_records=True,
        progress=False,
    )
    write_report(results, str(tmp_path / "out"))
    _assert_plain_modes(
        tmp_path / "out", ["results.json", "results.md", "predictions.jsonl", "retrieval.png", "perplexity.png"]
    )


def test_selected_bases_plot(umask, tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "select_bases.py"),
            "--strategy",
            "uniform",
            "--heads",
            "4",
            "--head-dim",
            "16",
            "--base-min",
            "100",
            "--base-max",
            "1000",
            "--target-length",
            "512",
            "--plot",
            str(tmp_path / "out" / "bases.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    _assert_plain_modes(tmp_path / "out", ["bases.png"])


def test_hf_export_weights(umask, tmp_path):
    from megatron_harpe.convert.hf_files import staging_directory, write_safetensors

    tensors = [("a.weight", torch.ones(4, 4)), ("b.weight", torch.zeros(8))]
    with staging_directory(tmp_path / "single") as staging:  # safetensors writes 0600 itself
        write_safetensors(iter(tensors), staging)
        (staging / "config.json").write_text("{}")
    with staging_directory(tmp_path / "sharded") as staging:
        write_safetensors(iter(tensors), staging, max_shard_bytes=40)
    _assert_plain_modes(
        tmp_path,
        [
            "single",
            "single/model.safetensors",
            "single/config.json",
            "sharded",
            "sharded/model.safetensors.index.json",
            "sharded/model-00001-of-00002.safetensors",
        ],
    )


def test_prepared_dataset(umask, tmp_path):
    from megatron_harpe.data.pipeline import tokenize_corpus
    from megatron_harpe.eval.tasks.synthetic_kv import write_tokenizer

    tokenizer = write_tokenizer(tmp_path / "tok" / "tokenizer.json")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": "get 1 2 3 " * 20}) + "\n" for _ in range(5)))
    tokenize_corpus([corpus], tmp_path / "out" / "train", str(tokenizer), workers=0)
    _assert_plain_modes(tmp_path / "out", ["train.bin", "train.idx", "train.summary.json", "train.report.png"])


def _save_tiny_checkpoint(directory: str, mask: int) -> None:
    from megatron_harpe.checkpointing.checkpoint import save_checkpoint
    from megatron_harpe.config import ModelConfig
    from megatron_harpe.model import build_model
    from megatron_harpe.position.config import PositionConfig

    os.umask(mask)
    parallel.initialize(1, 1)
    model = build_model(
        ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=48, vocab_size=32),
        PositionConfig(type="rope"),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(
        directory, 1, model=model, config={"model": {"num_layers": 1}}, train_state={"step": 1}, optimizer=optimizer
    )


def test_checkpoint_files(umask, tmp_path):
    parallel.run_on_ranks(_save_tiny_checkpoint, 1, str(tmp_path / "ckpt"), umask)
    _assert_plain_modes(
        tmp_path / "ckpt",
        [
            "iter_0000001",
            "iter_0000001/train_state.json",
            "iter_0000001/config.yaml",
            "latest_checkpointed_iteration.txt",
        ],
    )


def test_conversion_both_ways(umask, tmp_path):
    """hf-to-megatron (a checkpoint plus the HF source's files) and megatron-to-hf (safetensors,
    config, tokenizer, HARPE code) through the tool, from a source whose files are private."""
    from megatron_harpe.commands import convert_checkpoint
    from megatron_harpe.eval.testing import save_tiny_llama, save_tiny_tokenizer

    source = tmp_path / "source"
    save_tiny_tokenizer(str(source))
    save_tiny_llama(str(source))
    for path in source.iterdir():
        path.chmod(0o600)  # e.g. a download kept private: the copies we write still follow the umask
    out = tmp_path / "out"
    try:
        assert (
            convert_checkpoint.main(
                [
                    "hf-to-megatron",
                    "--input",
                    str(source),
                    "--output",
                    str(out / "megatron"),
                    "--position.type",
                    "harpe",
                    "--position.strategy",
                    "uniform",
                    "--position.base_min",
                    "1e3",
                    "--position.base_max",
                    "1e4",
                ]
            )
            == 0
        )
        assert (
            convert_checkpoint.main(["megatron-to-hf", "--input", str(out / "megatron"), "--output", str(out / "hf")])
            == 0
        )
    finally:
        parallel.shutdown()  # the converter's one-process group: later tests expect none
    _assert_plain_modes(
        out,
        [
            "megatron/latest_checkpointed_iteration.txt",
            "megatron/iter_0000000/config.yaml",
            "hf/model.safetensors",
            "hf/config.json",
            "hf/tokenizer.json",
        ],
    )
