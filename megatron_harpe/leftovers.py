"""Remove the temporary files a killed run left next to an output, before writing it again.

Outputs are written under temporary names carrying the writer's pid (`x.tmp-PID.bin`,
`out.jsonl.tmp-PID`, `.model.incomplete-PID/`) and renamed when complete; a SIGKILL leaves the
temporary behind. The next writer of the same output calls

    remove_dead_temporaries(Path("out/corpus.bin"), r"corpus\\.tmp-(?P<pid>\\d+)\\.(bin|idx)")

which deletes those whose pid is no longer running on this host (a live writer's files stay)
and says so in one line on stderr. (A writer on another host sharing the filesystem would show
a pid that does not exist here: two hosts writing one output is unsupported anyway.)
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_dead_temporaries(directory: Path, pattern: str) -> list[Path]:
    """Remove the entries of `directory` whose whole name matches `pattern` (with a group
    `pid`) and whose pid is gone. Returns what was removed."""
    if not directory.is_dir():
        return []
    regex = re.compile(pattern)
    removed = []
    for entry in sorted(directory.iterdir()):
        match = regex.fullmatch(entry.name)
        if match is None or pid_alive(int(match.group("pid"))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        print(
            f"removed {len(removed)} leftover temporary file(s) of a killed run in {directory}: "
            + ", ".join(entry.name for entry in removed),
            file=sys.stderr,
        )
    return removed
