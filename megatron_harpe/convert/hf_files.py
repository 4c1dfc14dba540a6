"""Files of a Hugging Face model directory: weight shards read lazily, shards written in
bounded memory, tokenizer files, and output directories that appear only when complete.

    weights = HFWeights("llama2-7b")          # *.safetensors or pytorch_model*.bin, sharded or not
    tensor = weights.get("model.layers.0.self_attn.q_proj.weight")   # read on demand, tensor by tensor
    with staging_directory("out") as tmp:     # "out" appears only if the block succeeds
        write_safetensors(iter_of_name_tensor_pairs, tmp, max_shard_bytes=5 * 2**30)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from megatron_harpe.convert.keymap import IGNORED_HF
from megatron_harpe.convert.streaming import SafetensorsReader
from megatron_harpe.files import atomic_directory

# Every file transformers writes or reads for a tokenizer (sentencepiece, fast, BPE vocab/merges,
# WordPiece), its chat template(s), and the generation settings: all travel with a conversion.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TOKENIZER_DIRECTORIES = ("additional_chat_templates",)
_WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


class HFWeights:
    """Name -> tensor access over a HF checkpoint's shards without loading them all."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.directory = Path(hf_dir)
        self.file_of: dict[str, str] = {}
        self._handles: dict[str, object] = {}
        for index_name, single_name in _WEIGHT_LAYOUTS:
            index = self.directory / index_name
            if index.is_file():
                self.file_of = dict(read_json(index)["weight_map"])
                break
            if (self.directory / single_name).is_file():
                self.file_of = {name: single_name for name in self._open(single_name).keys()}
                break
        else:
            raise FileNotFoundError(
                f"no weights in {hf_dir}: expected model.safetensors(.index.json) or pytorch_model.bin(.index.json)"
            )
        missing = sorted({f for f in self.file_of.values() if not (self.directory / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{hf_dir} is missing weight shard(s) listed in its index: {', '.join(missing)}")

    def _open(self, file_name: str):
        if file_name not in self._handles:
            path = self.directory / file_name
            if file_name.endswith(".safetensors"):
                self._handles[file_name] = SafetensorsReader(path)  # file reads, no memory map
            else:
                self._handles[file_name] = _load_bin(path)
        return self._handles[file_name]

    @property
    def names(self) -> list[str]:
        return [name for name in self.file_of if not IGNORED_HF.match(name)]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise KeyError(f"{self.directory} has no weight {name!r}")
        handle = self._open(self.file_of[name])
        return handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._open(self.file_of[name])
        if isinstance(handle, SafetensorsReader):
            return handle.shape(name)
        return tuple(handle[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        handle = self._open(self.file_of[name])
        if isinstance(handle, SafetensorsReader):
            return handle.dtype(name)  # from the header: the tensor is not read
        return handle[name].dtype


def read_json(path: Path) -> dict:
    """A JSON file of a model directory; a damaged one is a ValueError naming the file."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): copy or download it again") from error


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:  # memory-mapped, so only the tensors asked for are read
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # files from torch < 1.6 (not zip) cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def check_weights_match(weights: HFWeights, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped weight."""
    present = set(weights.names)
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected) - {"lm_head.weight"})  # tied exports may keep lm_head
    wrong = [
        f"{name} {weights.shape(name)} (config says {shape})"
        for name, shape in expected.items()
        if name in present and weights.shape(name) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(f"wrong shapes {wrong[:8]}")
    if problems:
        raise ValueError(f"config.json does not match the weights in {weights.directory}: " + "; ".join(problems))
    for name in expected:  # a dtype the converter cannot read fails here, before anything is written
        weights.dtype(name)


def write_safetensors(
    tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """Write (name, tensor) pairs as HF safetensors shards, holding at most one shard in memory.

    One file -> model.safetensors; several -> model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json. Returns the file names written."""
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, total_bytes, files = 0, 0, []
    weight_map: dict[str, str] = {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"shard-{len(files):05d}.safetensors"
        try:
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        except SafetensorError as error:  # a full disk arrives as Rust's IoError text, not as an OSError
            raise _as_os_error(error, out_dir / name) from None
        files.append(name)
        weight_map.update({key: name for key in shard})
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        shard_bytes += size
        total_bytes += size
    if shard:
        flush()
    if len(files) == 1:
        os.rename(out_dir / files[0], out_dir / "model.safetensors")
        return ["model.safetensors"]
    final = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    for old, new in final.items():
        os.rename(out_dir / old, out_dir / new)
    index = {"metadata": {"total_size": total_bytes}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return list(final.values())


def _as_os_error(error: Exception, path: Path) -> Exception:
    """safetensors' "I/O error: ... (os error 28)" (or "IoError(Os { code: 28, ... })") as the
    OSError it reports (the command line then says "the disk is full" in one line); other
    SafetensorErrors unchanged."""
    found = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(error))
    if found is None:
        return error
    code = int(found.group(1) or found.group(2))
    return OSError(code, os.strerror(code), str(path))


def copy_tokenizer_files(source: str | Path, out_dir: Path) -> list[str]:
    """Copy a HF tokenizer (a directory), or make one from a sentencepiece `.model` or a
    `tokenizer.json` file. Returns the file names written."""
    source = Path(source)
    if source.is_dir():
        copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
        for name in copied:
            shutil.copy2(source / name, out_dir / name)
        for name in TOKENIZER_DIRECTORIES:
            if (source / name).is_dir():
                shutil.copytree(source / name, out_dir / name)
                copied.append(name)
        return copied
    if not source.is_file():
        raise FileNotFoundError(f"tokenizer {source} does not exist")
    if source.suffix == ".model":  # sentencepiece, Llama conventions (<s>=1, </s>=2, BOS prepended)
        shutil.copy2(source, out_dir / "tokenizer.model")
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        config.update(add_bos_token=True, add_eos_token=False)
        written = ["tokenizer.model"]
    elif source.name.endswith(".json"):
        shutil.copy2(source, out_dir / "tokenizer.json")
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        written = ["tokenizer.json"]
    else:
        raise ValueError(
            f"tokenizer {source}: give a HF tokenizer directory, a sentencepiece .model or a tokenizer.json"
        )
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return written + ["tokenizer_config.json"]


def check_output_directory(path: str | Path, overwrite: bool = False) -> Path:
    """`path` is absent or empty; with `overwrite` it may also hold an earlier model or checkpoint
    (config.json or config.yaml), never anything else (a mistyped --output is not deleted)."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return path
    if not path.is_dir():
        raise ValueError(f"output {path} is a file: choose a new directory")
    if not overwrite:
        raise ValueError(
            f"output directory {path} is not empty: pass --overwrite to replace it, or choose a new directory"
        )
    if not any(
        (path / marker).is_file() for marker in ("config.json", "config.yaml", "latest_checkpointed_iteration.txt")
    ):
        raise ValueError(
            f"output directory {path} holds neither a model nor a checkpoint: --overwrite replaces only "
            "those; choose a new directory"
        )
    return path


@contextlib.contextmanager
def staging_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of `path` that is renamed to `path` when the block succeeds and
    deleted when it fails, so `path` is either complete or absent (or, with `overwrite`, the
    earlier model it held until the new one is complete)."""
    final = check_output_directory(path, overwrite)
    with atomic_directory(final, replace=overwrite) as staging:
        yield staging
        check_output_directory(final, overwrite)  # nobody wrote there meanwhile
