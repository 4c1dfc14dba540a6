"""Faults: training on data other than the data it was meant to (issue 27 cases 1, 3, 4, 10).

    python -m pytest tests/faults/test_data_identity.py -q

Before: a dataset made with another tokenizer of the same vocabulary size trained without a
word; `tokenize --shard-dir` reused shards of a tokenizer retrained to the same path; megatron's
index cache outlived `tokenize --overwrite` (mismatched samples, or an IndexError); ids beyond
the model's vocabulary reached F.embedding. Now each is refused, or rebuilt, before any step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_support import error_lines, run
from data_support import copy_dataset, other_tokenizer, sample_corpus, tiny_training_config

from megatron_harpe.data.indexed import DatasetWriter, read_documents
from megatron_harpe.data.jsonl import FieldSpec
from megatron_harpe.data.pipeline import tokenize_corpus


def test_data_of_another_tokenizer_with_the_same_vocabulary_is_refused_in_one_line(demo_data, tmp_path: Path) -> None:
    other = other_tokenizer(Path(demo_data.tokenizer), tmp_path / "other.model")
    config = tiny_training_config(tmp_path / "run.yaml", demo_data.prefix, str(other))
    completed = run("pretrain_harpe.py", "--config", str(config), "--dry-run")
    assert completed.returncode == 2, completed.stdout + completed.stderr
    (line,) = error_lines(completed.stderr)
    assert f"{demo_data.prefix} was tokenized with {Path(demo_data.tokenizer).resolve()}" in line
    assert f"but data.tokenizer is {other}" in line and "4096 tokens" in line
    assert "Traceback" not in completed.stderr
    same = tiny_training_config(tmp_path / "same.yaml", demo_data.prefix, str(demo_data.tokenizer))
    assert run("pretrain_harpe.py", "--config", str(same), "--dry-run").returncode == 0


def test_a_dataset_that_records_no_tokenizer_still_trains_with_a_note(demo_data, tmp_path: Path) -> None:
    from megatron_harpe.data.identity import check_training_data

    prefix = copy_dataset(demo_data.prefix, tmp_path)
    summary = json.loads(Path(prefix + ".summary.json").read_text())
    del summary["tokenizer_identity"], summary["max_token_id"]  # as written before this change
    Path(prefix + ".summary.json").write_text(json.dumps(summary))
    (note,) = check_training_data([prefix], str(demo_data.tokenizer), 4096, cache_dir=tmp_path / "cache")
    assert note.startswith(f"note: data.prefixes[0]={prefix} records no tokenizer hash")
    assert list((tmp_path / "cache").glob("*-max_token_id.json"))  # measured once, remembered


def test_token_ids_beyond_the_vocabulary_are_refused_before_the_first_step(demo_data, tmp_path: Path) -> None:
    prefix = str(tmp_path / "wide")
    with DatasetWriter(prefix, vocab_size=8000) as writer:  # no summary: the ids are measured
        writer.add_documents(np.arange(7000, 7900, dtype=np.int64) % 8000, np.array([300, 300, 300]))
    config = tiny_training_config(tmp_path / "run.yaml", prefix, str(demo_data.tokenizer))
    completed = run("pretrain_harpe.py", "--config", str(config), "--dry-run")
    assert completed.returncode == 2, completed.stdout + completed.stderr
    (line,) = error_lines(completed.stderr)
    assert f"data.prefixes[0]={prefix} holds token id 7899, beyond model.vocab_size=4096" in line
    assert "Traceback" not in completed.stderr


def _train(tree: dict) -> str:
    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.training.loop import train

    try:
        train(from_dict(Config, tree))
    except ValueError as error:
        return str(error)
    return "trained"


@pytest.mark.slow
@pytest.mark.distributed
def test_the_trainer_itself_refuses_another_tokenizer(demo_data, tmp_path: Path) -> None:
    """Without the command line's check (a library call of train): every rank, before step 1."""
    import yaml

    from megatron_harpe import parallel

    other = other_tokenizer(Path(demo_data.tokenizer), tmp_path / "other.model")
    tree = yaml.safe_load(tiny_training_config(tmp_path / "run.yaml", demo_data.prefix, str(other)).read_text())
    messages = parallel.run_on_ranks(_train, 2, tree)
    assert "was tokenized with" in messages[0] and "but data.tokenizer is" in messages[0]
    assert messages[1] == "the training data was refused (rank 0 says why)" or "was tokenized with" in messages[1]


def _tokenize(inputs, prefix, tokenizer, **options) -> dict:
    return tokenize_corpus(
        [inputs], prefix, str(tokenizer), fields=FieldSpec(source_field=None), workers=0, write_report=False, **options
    )


def test_shards_of_a_tokenizer_retrained_to_the_same_path_are_not_reused(demo_data, tmp_path: Path) -> None:
    corpus = sample_corpus(demo_data, tmp_path / "corpus.jsonl")
    tokenizer = tmp_path / "tok.model"
    shutil.copy2(demo_data.tokenizer, tokenizer)
    _tokenize(corpus, tmp_path / "first", tokenizer, shard_dir=tmp_path / "shards")
    other_tokenizer(Path(demo_data.tokenizer), tokenizer)  # train-tokenizer --overwrite to the same path
    with pytest.raises(ValueError, match=r"shard .*shard-00000 was written from other input or settings"):
        _tokenize(corpus, tmp_path / "second", tokenizer, shard_dir=tmp_path / "shards")
    _tokenize(corpus, tmp_path / "second", tokenizer, shard_dir=tmp_path / "shards", overwrite=True)
    _tokenize(corpus, tmp_path / "fresh", tokenizer)
    second, fresh, first = (read_documents(tmp_path / name) for name in ("second", "fresh", "first"))
    assert all(np.array_equal(a, b) for a, b in zip(second, fresh)) and len(second) == len(fresh)
    assert not all(np.array_equal(a, b) for a, b in zip(second, first))


def _samples(prefix: Path, tokenizer: str) -> list[np.ndarray]:
    from megatron_harpe.data.loader import build_gpt_dataset
    from megatron_harpe.data.tokenizer import load_tokenizer

    dataset = build_gpt_dataset(
        [str(prefix)], None, seq_length=32, num_samples=40, seed=3, tokenizer=load_tokenizer(tokenizer)
    )
    return [dataset[index]["tokens"].numpy() for index in range(len(dataset))]


def test_megatron_index_cache_does_not_outlive_tokenize_overwrite(demo_data, tmp_path: Path) -> None:
    """Same number of documents, other documents: the old code trained on the old sample indices."""
    data = tmp_path / "data"
    data.mkdir()
    _tokenize(sample_corpus(demo_data, tmp_path / "a.jsonl", 60, start=0), data / "train", demo_data.tokenizer)
    _samples(data / "train", demo_data.tokenizer)  # caches megatron's indices for these documents
    legacy = data / "train" / "cache" / "GPTDataset_indices"
    legacy.mkdir(parents=True)  # where megatron-core caches them by default (the old code's place)
    (legacy / "stale-description.txt").write_text("{}")
    _tokenize(
        sample_corpus(demo_data, tmp_path / "b.jsonl", 60, start=300),
        data / "train",
        demo_data.tokenizer,
        overwrite=True,
    )
    assert not (data / "train").exists()  # --overwrite removed what it replaced
    assert not [
        path for path in (data / "index_cache").glob("*-description.txt") if str(data / "train") in path.read_text()
    ]
    _tokenize(sample_corpus(demo_data, tmp_path / "b.jsonl", 60, start=300), tmp_path / "fresh", demo_data.tokenizer)
    reused, fresh = _samples(data / "train", demo_data.tokenizer), _samples(tmp_path / "fresh", demo_data.tokenizer)
    assert len(reused) == len(fresh) and all(np.array_equal(a, b) for a, b in zip(reused, fresh))
