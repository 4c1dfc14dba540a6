"""An offline demo corpus gathered from the local Python installation, and the whole demo data
preparation (corpus -> sentencepiece tokenizer -> length upsampling -> Megatron dataset).

    python -c "from megatron_harpe.data.demo_corpus import prepare_demo_data; print(prepare_demo_data('work/demo'))"
    harpe-prepare-data demo --output-dir work/demo          # the same from the CLI

Nothing is downloaded and nothing large is committed: the text is CPython's standard library
(PSF License; its LICENSE.txt is copied next to the corpus). Four sources, named by what they
are, with their SlimPajama analogue:

| source     | documents                                              | like          | lengths      |
|------------|--------------------------------------------------------|---------------|--------------|
| Github     | stdlib source files, or their top-level definitions    | Github        | short, long  |
| Manual     | a manual per module (signatures and docstrings), or    | Book          | short, long  |
|            | per top-level class/function                           |               |              |
| Docstrings | one function/class docstring each                      | C4            | short        |
| Reference  | the language-reference topics of `pydoc_data.topics`   | Wikipedia     | medium       |

Modules are sorted and dealt round-robin to Github / Manual / Docstrings, so no text appears in
two sources; three Github / Manual modules in four are cut into one document per top-level
definition, so those sources mix short and long documents as web sources do. The corpus is
identical on machines with the same CPython release (3.11.x patch releases may differ slightly);
documents are shuffled with a fixed seed so sources interleave.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import os
import random
import sysconfig
import tokenize
import warnings
from pathlib import Path
from typing import Iterator

from megatron_harpe import files
from megatron_harpe.data.jsonl import atomic_output

DEMO_SHARES = {"Github": 0.4, "Manual": 0.3, "Reference": 0.2, "Docstrings": 0.1}
"""The demo mixture (user-given shares, as `--shares` would give them)."""
DEMO_LENGTH_THRESHOLD = 1024
"""'Long' for the demo: the CPU demo trains on 512-2048-token sequences, not 128k."""
DEMO_TOTAL_TOKENS = 500_000
DEMO_VOCAB_SIZE = 4096
DEMO_SEED = 1234

# Packages some distributions ship separately or that are mostly data/tests: left out so the
# corpus is the same wherever Python 3.11 is installed.
_EXCLUDED_TOP_LEVEL = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "distutils",
    "site-packages",
    "dist-packages",
    "encodings",
    "pydoc_data",
    "__phello__",
    "config-3.11-x86_64-linux-gnu",
    "lib-dynload",
    "turtle.py",
    "antigravity.py",
    "this.py",
}
_SOURCE_CHAR_BUDGET = {"Github": 1_800_000, "Manual": 1_000_000, "Docstrings": 700_000}
_MIN_DOCSTRING_CHARS = 60


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_modules(stdlib: Path) -> list[tuple[str, Path]]:
    """(dotted module name, path) of stdlib .py files outside the excluded packages, sorted."""
    paths = []
    for directory, subdirectories, file_names in os.walk(stdlib):
        relative = Path(directory).relative_to(stdlib)
        # prune before descending: site-packages alone can hold hundreds of thousands of files
        subdirectories[:] = [
            name
            for name in subdirectories
            if name not in ("tests", "test", "__pycache__")
            and not (relative == Path(".") and name in _EXCLUDED_TOP_LEVEL)
        ]
        paths += [
            Path(directory) / name
            for name in file_names
            if name.endswith(".py") and not (relative == Path(".") and name in _EXCLUDED_TOP_LEVEL)
        ]
    modules = []
    for path in sorted(paths):
        name = ".".join(path.relative_to(stdlib).with_suffix("").parts).removesuffix(".__init__")
        modules.append((name, path))
    return modules


def _read_source(path: Path) -> str:
    with tokenize.open(path) as stream:  # honours PEP 263 coding cookies
        return stream.read()


def _definitions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, str, str | None]]:
    """(qualified name, signature line, docstring) of classes and functions, in source order."""
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            signature = f"def {prefix}{node.name}({ast.unparse(node.args)})"
            yield prefix + node.name, signature, ast.get_docstring(node)
        elif isinstance(node, ast.ClassDef):
            bases = ", ".join(ast.unparse(base) for base in node.bases)
            yield prefix + node.name, f"class {prefix}{node.name}({bases})", ast.get_docstring(node)
            yield from _definitions(node, prefix + node.name + ".")


def _manual_entry(signature: str, docstring: str | None) -> str:
    return signature + ("\n    " + docstring.replace("\n", "\n    ") if docstring else "")


def _module_manuals(name: str, tree: ast.Module, whole: bool) -> list[str]:
    """The whole module manual, or one manual per top-level class/function."""
    entries = list(_definitions(tree))
    if whole:
        parts = [f"Module {name}", "=" * (7 + len(name))]
        module_doc = ast.get_docstring(tree)
        parts += [module_doc] if module_doc else []
        parts += [_manual_entry(signature, docstring) for _, signature, docstring in entries]
        return ["\n\n".join(parts) + "\n"]
    manuals: dict[str, list[str]] = {}
    for qualified, signature, docstring in entries:
        manuals.setdefault(qualified.split(".")[0], []).append(_manual_entry(signature, docstring))
    return [
        f"{name}.{top}\n\n" + "\n\n".join(parts) + "\n"
        for top, parts in manuals.items()
        if any("\n" in p for p in parts)
    ]


def _module_sources(code: str, tree: ast.Module, whole: bool) -> list[str]:
    """The whole source file, or the source of each top-level class/function."""
    if whole:
        return [code] if code.strip() else []
    lines = code.splitlines(keepends=True)
    pieces = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.end_lineno is not None:
            first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
            piece = "".join(lines[first - 1 : node.end_lineno])
            if len(piece) >= _MIN_DOCSTRING_CHARS:
                pieces.append(piece)
    return pieces


def _module_docstrings(name: str, tree: ast.Module) -> list[str]:
    return [
        f"{name}.{qualified}: {signature}\n\n{docstring}\n"
        for qualified, signature, docstring in _definitions(tree)
        if docstring and len(docstring) >= _MIN_DOCSTRING_CHARS
    ]


def demo_documents() -> list[dict[str, str]]:
    """All demo documents as `{"text", "source"}` records, before shuffling."""
    from pydoc_data.topics import topics

    documents = [{"text": topics[key], "source": "Reference"} for key in sorted(topics)]
    used = {source: 0 for source in _SOURCE_CHAR_BUDGET}
    groups = ("Github", "Manual", "Docstrings")
    for index, (name, path) in enumerate(_stdlib_modules(_stdlib_dir())):
        source = groups[index % len(groups)]
        whole = (index // len(groups)) % 4 == 0
        if all(used[group] >= _SOURCE_CHAR_BUDGET[group] for group in groups):
            break
        if used[source] >= _SOURCE_CHAR_BUDGET[source]:
            continue
        try:
            code = _read_source(path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(code)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if source == "Github":
            texts = _module_sources(code, tree, whole)
        elif source == "Manual":
            texts = _module_manuals(name, tree, whole)
        else:
            texts = _module_docstrings(name, tree)
        for text in texts:
            documents.append({"text": text, "source": source})
            used[source] += len(text)
    return documents


def build_demo_corpus(output_jsonl: str | Path, seed: int = DEMO_SEED, overwrite: bool = False) -> Path:
    """Write the demo corpus (jsonl, fields `text` and `source`) and the PSF licence next to it."""
    output_jsonl = Path(output_jsonl)
    documents = demo_documents()
    random.Random(seed).shuffle(documents)
    with atomic_output(output_jsonl, overwrite=overwrite) as temporary:
        with open(temporary, "w", encoding="utf-8") as stream:
            for record in documents:
                stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    licence = _stdlib_dir() / "LICENSE.txt"
    notice = output_jsonl.with_name("LICENSE-PSF.txt")
    header = "The demo corpus next to this file is text from the CPython standard library, under this licence:\n\n"
    body = (
        licence.read_text(encoding="utf-8")
        if licence.is_file()
        else "PSF License Agreement for Python 3.11: https://docs.python.org/3.11/license.html\n"
    )
    files.write_text(notice, header + body)
    return output_jsonl


@dataclasses.dataclass(frozen=True)
class DemoData:
    corpus: Path
    tokenizer: Path
    prefix: str
    """Megatron dataset prefix (`.bin`/`.idx`), upsampled with the demo shares."""
    summary: Path


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialize concurrent callers (e.g. several ranks preparing the same workdir)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking, atomic renames still avoid torn files
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_demo_data(workdir: str | Path, vocab_size: int = DEMO_VOCAB_SIZE, workers: int | None = None) -> DemoData:
    """Corpus -> sentencepiece tokenizer -> upsampled Megatron dataset in `workdir`; a step
    whose output exists is skipped, so a second call costs nothing."""
    from megatron_harpe.data.indexed import dataset_exists
    from megatron_harpe.data.pipeline import prepare
    from megatron_harpe.data.tokenizer import train_sentencepiece
    from megatron_harpe.data.upsample import UpsampleConfig

    workdir = Path(workdir)
    corpus = workdir / "corpus.jsonl"
    tokenizer_prefix = workdir / "tokenizer"
    dataset_prefix = str(workdir / "demo_text_document")
    with _exclusive(workdir / ".prepare.lock"):
        if not corpus.is_file():
            build_demo_corpus(corpus)
        tokenizer = Path(f"{tokenizer_prefix}.model")
        if not tokenizer.is_file():
            with open(corpus, encoding="utf-8") as stream:
                texts = (json.loads(line)["text"] for line in stream)
                train_sentencepiece(texts, tokenizer_prefix, vocab_size)
        if not (os.path.exists(dataset_prefix + ".bin") and os.path.exists(dataset_prefix + ".idx")):
            config = UpsampleConfig(
                mode="per_source",
                total_tokens=DEMO_TOTAL_TOKENS,
                shares=dict(DEMO_SHARES),
                length_threshold=DEMO_LENGTH_THRESHOLD,
                seed=DEMO_SEED,
            )
            prepare(
                [corpus],
                dataset_prefix,
                config,
                str(tokenizer),
                workers=workers,
                overwrite=dataset_exists(dataset_prefix),
            )
    return DemoData(
        corpus=corpus, tokenizer=tokenizer, prefix=dataset_prefix, summary=Path(f"{dataset_prefix}.summary.json")
    )
