"""The front door of every command-line tool: our messages, not our dependencies'.

Every entry point (pretrain_harpe.py, tools/*.py, `python -m megatron_harpe.launch`) ends in

    if __name__ == "__main__":
        sys.exit(cli.run(main, gpu_note=True))

and so behaves the same way:

- quiet by default: the warnings megatron-core, Transformer Engine, Apex and torch's
  distributed checkpointing raise on import or on our calls (fallback notes, deprecations) and
  their log records below ERROR are hidden, by category and module, never wholesale, so our own
  warnings still show. Instead, training, evaluation and conversion print at most one line,
  on rank 0, naming the optional GPU libraries that are absent.
- `--verbose` (anywhere on the command line before a `--`) shows third-party output again;
  `--debug` adds the traceback to an error. Both reach worker processes (torchrun's ranks,
  spawned helpers) through the environment variables MEGATRON_HARPE_VERBOSE / _DEBUG, which
  can also be set directly.
- exit codes: 0 done, 1 a failed check (e.g. conversion verification), 2 a user error (bad
  argument, config, input file, unwritable or full output directory: one line `error: ...`,
  printed once, by rank 0), 130 interrupted (Ctrl-C: one line, by rank 0).

Nothing here imports torch or megatron: `--help` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from importlib.util import find_spec

VERBOSE_ENV = "MEGATRON_HARPE_VERBOSE"
DEBUG_ENV = "MEGATRON_HARPE_DEBUG"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

THIRD_PARTY_MODULES = r"(megatron\.core|transformer_engine|apex|torch\.distributed\.(checkpoint|fsdp))(\.|$)"
"""Modules whose warnings are hidden (unless --verbose): megatron-core's "Transformer Engine /
Apex are not installed, falling back" notes and its own deprecations, the FutureWarnings
torch's distributed checkpointing raises on megatron-core's calls, and FSDP2's note that the
model returns a view (the trainer never changes its output in place)."""
THIRD_PARTY_LOGGERS = ("megatron", "transformer_engine", "apex", "torch.distributed.checkpoint")
OPTIONAL_GPU_LIBRARIES = {"transformer_engine": "Transformer Engine", "apex": "Apex"}
_PATH_ERRNOS = {
    errno.ENOSPC: "the disk is full: free space or choose another directory",
    errno.EDQUOT: "the disk quota is exceeded: free space or choose another directory",
    errno.EROFS: "the file system is read-only: choose a writable directory",
    errno.EACCES: "permission denied: choose a path you can write to (or fix its permissions)",
    errno.EPERM: "operation not permitted: choose a path you can write to (or fix its permissions)",
}

_interrupt_note: Callable[[], str | None] | None = None


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def verbose() -> bool:
    """--verbose was given (here or to a parent process)."""
    return _flag(VERBOSE_ENV) or "--verbose" in _own_arguments(sys.argv[1:])


def _own_arguments(argv: Sequence[str]) -> list[str]:
    return list(argv[: list(argv).index("--")] if "--" in argv else argv)


def debug() -> bool:
    return _flag(DEBUG_ENV)


def is_rank_zero() -> bool:
    """Rank 0 of a torchrun job, or a process started without torchrun."""
    return os.environ.get("RANK", "0") == "0"


def take_common_flags(argv: Sequence[str]) -> list[str]:
    """Remove --verbose / --debug from `argv` (up to a `--`, after which the arguments belong to
    another program) and record them in the environment, so child processes inherit them."""
    rest: list[str] = []
    for index, arg in enumerate(argv):
        if arg == "--":
            return rest + list(argv[index:])
        if arg == "--verbose":
            os.environ[VERBOSE_ENV] = "1"
        elif arg == "--debug":
            os.environ[DEBUG_ENV] = "1"
        else:
            rest.append(arg)
    return rest


def add_common_flags(parser) -> None:
    """--verbose and --debug in a tool's --help (`run` takes them out of argv before parsing)."""
    parser.add_argument(
        "--verbose", action="store_true", help="show third-party warnings and logs (megatron-core, TE, torch)"
    )
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")


# ------------------------------------------------------------------ one command-line vocabulary
# Every tool builds its flags from these helpers, so the same thing has the same name, type and
# help everywhere (pretrain_harpe.py takes its settings from the config instead).

DTYPES = ("fp32", "bf16", "fp16")
"""The weight dtypes a tool accepts (`--dtype`); torch_dtype() maps them."""


def torch_dtype(name: str | None):
    """The torch dtype of a `--dtype` name (None stays None: "the source's own")."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples of a tool's docstring line by line in --help."""


def parser_for(description: str | None, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser showing `description` (a module docstring with examples) as written."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, **kwargs)


def add_model(parser, *, required: bool = True, help: str | None = None) -> None:
    parser.add_argument(
        "--model",
        required=required,
        help=help or "a megatron_harpe checkpoint directory or a Hugging Face model directory",
    )


def add_tokenizer(parser, *, required: bool = False, help: str | None = None) -> None:
    text = "a Hugging Face tokenizer directory, a sentencepiece .model or a tokenizer.json"
    parser.add_argument("--tokenizer", required=required, default=None, help=f"{text}{': ' + help if help else ''}")


def add_parallel(
    parser,
    *,
    tensor: str | None = "tensor-parallel size",
    context: str | None = "context-parallel size",
    default: int | None = 1,
) -> None:
    """--tensor-parallel / --context-parallel (pass None to leave one out)."""
    if tensor is not None:
        parser.add_argument("--tensor-parallel", type=int, default=default, help=tensor)
    if context is not None:
        parser.add_argument("--context-parallel", type=int, default=default, help=context)


def add_model_backend(parser, *, tokenizer: str, context: str) -> None:
    """How evaluation and analysis load `--model`: tokenizer, remote code, device, dtype, TP x CP."""
    add_tokenizer(parser, help=tokenizer)
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (HARPE export)")
    parser.add_argument("--device", default="cpu", help="torch device of a Hugging Face model (default cpu)")
    add_dtype(parser, default="fp32", help="weight dtype of a Hugging Face model")
    add_parallel(parser, tensor="megatron checkpoint: tensor-parallel size (under torchrun)", context=context)


def parse_with_overrides(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, list[str]]:
    """The parser's flags, and the config overrides among the rest (`--section.key value` or
    `section.key=value`, as pretrain_harpe.py takes them); anything else is a usage error."""
    from megatron_harpe.config import parse_overrides

    args, rest = parser.parse_known_args(argv)
    try:
        return args, parse_overrides(rest)
    except ValueError as error:
        parser.error(str(error))


def add_dtype(parser, *, default: str | None = None, help: str = "weight dtype") -> None:
    parser.add_argument("--dtype", choices=DTYPES, default=default, help=f"{help} ({'|'.join(DTYPES)})")


def add_output_dir(parser, *, required: bool = False, default: str | None = None, help: str) -> None:
    parser.add_argument("--output-dir", required=required, default=default, help=help)


def add_output(parser, *, required: bool = True, help: str) -> None:
    parser.add_argument("--output", required=required, help=help)


def add_overwrite(parser, what: str = "existing outputs") -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what} (refused without it)")


def add_text_key(parser) -> None:
    parser.add_argument(
        "--text-key",
        default="text",
        help="jsonl field holding the text; dotted paths reach nested keys (default: text)",
    )


def add_progress(parser) -> None:
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it shows only on a terminal, and only on rank 0)"
    )


def show_progress(no_progress: bool = False) -> bool:
    """Whether to draw a progress bar: on a terminal, on rank 0, unless --no-progress."""
    return not no_progress and is_rank_zero() and sys.stderr.isatty()


def progress_bar(total: float | None, description: str, *, enabled: bool, unit: str = "it", unit_scale: bool = False):
    """A tqdm bar on stderr with rate and ETA (`[elapsed<remaining, rate]`); a silent one when
    not `enabled` (see show_progress)."""
    import shutil

    from tqdm import tqdm

    size = shutil.get_terminal_size(fallback=(0, 0))  # a terminal reporting no size (0 x 0) gets 100 x 20:
    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        unit_scale=unit_scale,
        disable=not enabled,  # tqdm
        ncols=size.columns or 100,
        nrows=size.lines or 20,
        mininterval=0.5,
        file=sys.stderr,
    )  # hides at 0


def refuse_existing(path: str | os.PathLike, overwrite: bool, what: str = "output") -> None:
    """A user error if `path` exists (a non-empty directory, or a file) and --overwrite is not given."""
    existing = os.path.isfile(path) or (os.path.isdir(path) and any(os.scandir(path)))
    if existing and not overwrite:
        raise FileExistsError(f"{what} {path} already exists: pass --overwrite to replace it or choose another path")


def quiet_third_party() -> None:
    """Hide third-party warnings and log records below ERROR, unless verbose. Idempotent; runs on
    import of this module too, so spawned workers that import an entry point are quiet as well."""
    if verbose():
        return
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY_MODULES)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # transformers configures its own logger on first use from this variable (a user's choice wins)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # transformers' "Loading weights" bars follow huggingface_hub's switch, read when it is imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def missing_gpu_libraries() -> list[str]:
    """The optional GPU libraries megatron-core would use that are not installed (no import)."""
    return [label for module, label in OPTIONAL_GPU_LIBRARIES.items() if find_spec(module) is None]


def note_missing_gpu_libraries() -> None:
    """One line on rank 0 saying which optional GPU libraries are absent (nothing if none)."""
    missing = missing_gpu_libraries()
    if missing and is_rank_zero():
        print(
            f"note: {' and '.join(missing)} not installed: megatron-core uses its PyTorch fallbacks "
            "(slower on GPUs; --verbose shows its warnings)",
            file=sys.stderr,
            flush=True,
        )


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported when a tool draws (not for --help)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def on_interrupt(note: Callable[[], str | None]) -> None:
    """Register what to say when the run is interrupted (e.g. the trainer's last checkpoint)."""
    global _interrupt_note
    _interrupt_note = note


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of an error the user can fix, None for anything else (a bug)."""
    if isinstance(error, OSError) and not isinstance(error, (ConnectionError, TimeoutError)):
        if error.errno is None and error.filename is None:  # raised by us with a message: FileNotFoundError("...")
            return (
                str(error)
                if isinstance(
                    error, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
                )
                else None
            )
        filename = f"{error.filename}: " if error.filename else ""
        if isinstance(error, FileNotFoundError):
            return f"{filename}no such file or directory"
        if isinstance(error, IsADirectoryError):
            return f"{filename}is a directory, expected a file"
        if isinstance(error, NotADirectoryError):
            return f"{filename}is not a directory"
        if isinstance(error, FileExistsError):
            return f"{filename}already exists"
        if error.errno in _PATH_ERRNOS:
            return filename + _PATH_ERRNOS[error.errno]
        return None
    if isinstance(error, (ValueError, UnicodeError)):
        return str(error)
    # "enforce fail at inline_container.cc" and friends: torch reports a failed write (often a
    # full disk) as a RuntimeError carrying the OS error text only.
    if isinstance(error, RuntimeError) and "No space left on device" in str(error):
        return "the disk is full: free space or choose another directory (" + str(error).splitlines()[0] + ")"
    return None


def _interrupted_message() -> str:
    note = None
    if _interrupt_note is not None:
        try:
            note = _interrupt_note()
        except Exception:  # noqa: BLE001 - the note is a courtesy; never mask the interrupt
            note = None
    return "interrupted" + (f": {note}" if note else "")


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *, gpu_note: bool = False) -> int:
    """Run a tool's `main(argv)` behind the front door; returns the exit code.

    `gpu_note`: print the one-line note on missing optional GPU libraries when the tool has run
    (tools that build models: evaluation, conversion); not after a user error, which stays one
    line, nor for --help. The trainer prints it itself, before its first step."""
    arguments = take_common_flags(sys.argv[1:] if argv is None else argv)
    quiet_third_party()
    interrupted = False

    def _interrupt(signum, frame):  # remember it: a peer rank's exit may surface as another error
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    previous_handler = signal.getsignal(signal.SIGINT)
    if previous_handler is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        code = main(arguments)
        code = 0 if code is None else int(code)
        if gpu_note and code != EXIT_USER_ERROR:
            note_missing_gpu_libraries()
        return code
    except KeyboardInterrupt:
        return _report_interrupt()
    except BrokenPipeError:  # `tool ... | head`: the reader left; no traceback (Python's documented remedy)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:  # noqa: BLE001 - the front door decides what the user sees
        if interrupted:
            return _report_interrupt()
        if getattr(error, "report_on_every_rank", False):
            return report_rank_failure(error)
        if user_error_message(error) is None:
            raise  # a bug: the full traceback
        return report_user_error(error)
    finally:
        if previous_handler is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_handler)


def report_user_error(error: BaseException) -> int:
    """Print `error: <one line>` (rank 0 only; the traceback too under --debug); returns 2."""
    if debug():
        traceback.print_exception(error)
    if is_rank_zero():
        message = user_error_message(error) or str(error)
        print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def report_rank_failure(error: BaseException) -> int:
    """A failure one rank sees and the others may not (a stuck or dead peer): every rank prints
    its own `error:` line, so the log names the rank that noticed; returns 1 (not a user error)."""
    if debug():
        traceback.print_exception(error)
    print(f"error: {error}", file=sys.stderr, flush=True)
    return 1


def _report_interrupt() -> int:
    if debug():
        traceback.print_exc()
    if is_rank_zero():
        print(_interrupted_message(), file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


quiet_third_party()
