"""Write files for users atomically, with the mode a plain `open()` would give them.

Every output a user or a teammate reads (results, reports, plots, selected bases, exported
weights, datasets, checkpoints) goes through this module:

    from megatron_harpe import files

    files.write_text("out/results.md", table)               # or write_bytes / write_json
    with files.atomic_path("out/model.safetensors") as temporary:
        save_file(tensors, str(temporary))                  # a library writes the file itself
    files.save_figure(figure, "out/plot.png")
    with files.atomic_directory("export/") as staging:      # many files, published together
        ...

Each file is written under a temporary name in the same directory (`NAME.tmp-PID`, so a later
writer can remove what a killed one left: megatron_harpe.leftovers), flushed to disk, given the
mode `0o666 & ~umask` (directories `0o777 & ~umask`) and renamed into place: a reader sees the
old file or the complete new one, never half of one. The explicit mode matters because the
usual tools for temporary files create them private: `tempfile.mkstemp` makes 0600,
`tempfile.mkdtemp` 0700, and safetensors' `save_file` writes 0600 (safetensors issue 782);
renamed into place, such files would stay unreadable for teammates on a shared cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from megatron_harpe.leftovers import remove_dead_temporaries


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file under the current umask."""
    return 0o666 & ~current_umask()


def directory_mode() -> int:
    """The mode `os.mkdir(path)` gives a new directory under the current umask."""
    return 0o777 & ~current_umask()


def temporary_name(path: str | Path) -> Path:
    """The temporary sibling `path` is written to before the rename: `NAME.tmp-PID`."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def share(path: str | Path) -> None:
    """Give a file or a whole tree written by someone else's code (a library's 0600 file, a
    `mkdtemp` 0700 directory) the modes a plain open()/mkdir() would have given it."""
    path = Path(path)
    fmode, dmode = file_mode(), directory_mode()
    if path.is_dir() and not path.is_symlink():
        os.chmod(path, dmode)
        for root, directories, names in os.walk(path):
            for name in directories:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), dmode)
            for name in names:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), fmode)
    elif not path.is_symlink():
        os.chmod(path, fmode)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not open directories; the rename is done anyway
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def publish(temporary: str | Path, path: str | Path) -> Path:
    """Flush a finished temporary file to disk, give it the umask's mode and rename it to `path`
    (for writers that produce several files and publish them together, e.g. a dataset's .bin/.idx)."""
    temporary, path = Path(temporary), Path(path)
    _fsync_file(temporary)
    share(temporary)
    os.replace(temporary, path)
    _fsync_directory(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `path` for any writer (ours or a library's); when the block
    succeeds it is published as `path` (fsync, umask mode, rename); when it fails it is removed.
    With `overwrite=False` an existing `path` is refused (checked before and at the rename)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"output {path} already exists: pass --overwrite to replace it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(path.parent, rf"{re.escape(path.name)}\.tmp-(?P<pid>\d+)")
    temporary = temporary_name(path)
    try:
        yield temporary
        if path.exists() and not overwrite:  # another run may have finished meanwhile
            raise ValueError(
                f"output {path} was written by another run while this one worked: nothing of this run "
                "was kept; pass --overwrite to replace it or choose another path"
            )
        publish(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """`open(path, mode)` on a temporary name, published as `path` when the block succeeds."""
    if "w" not in mode:
        raise ValueError(f"atomic_open writes a new file: mode {mode!r} must contain 'w'")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as temporary:
        with open(temporary, mode, **kwargs) as handle:
            yield handle


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(data, indent=indent) + "\n")


def save_figure(figure: Any, path: str | Path, **savefig: Any) -> Path:
    """Save a matplotlib figure as PNG (savefig's keyword arguments pass through), then close it."""
    import matplotlib.pyplot as plt

    savefig.setdefault("format", "png")
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, **savefig)
    finally:
        plt.close(figure)
    return Path(path)


def staging_name(path: str | Path) -> Path:
    """The hidden sibling a directory output is assembled in: `.NAME.incomplete-PID`."""
    path = Path(path)
    return path.with_name(f".{path.name}.incomplete-{os.getpid()}")


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory next to `path`; when the block succeeds every file in it
    gets the umask's modes, is flushed, and the directory is renamed to `path` (which must be
    absent or empty, unless `replace`: then the old `path` is renamed away and deleted once the
    new one is in place); when it fails the staging directory is removed."""
    final = Path(path)
    remove_dead_temporaries(final.parent, rf"\.{re.escape(final.name)}\.(incomplete|replaced)-(?P<pid>\d+)")
    staging = staging_name(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        share(staging)
        for root, _, names in os.walk(staging):
            for name in names:
                if not os.path.islink(os.path.join(root, name)):
                    _fsync_file(Path(root, name))
        replaced = None
        if final.exists() and replace and (not final.is_dir() or any(final.iterdir())):
            replaced = final.with_name(f".{final.name}.replaced-{os.getpid()}")
            os.rename(final, replaced)
        elif final.exists():
            final.rmdir()  # empty (checked by the caller); OSError if someone wrote there meanwhile
        os.rename(staging, final)
        _fsync_directory(final.parent)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
