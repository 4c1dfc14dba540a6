"""Keep what an evaluation computed: every scored sample is appended to `samples.jsonl` in the
output directory as soon as it is scored, so an interrupted or failed run keeps it, and
`--resume` continues from it.

    store = RunStore("eval_out", settings, resume=True, writer=is_rank_zero)
    record = store.get("cwe", 4096, 7)          # a sample scored by an earlier run, or None
    store.add({"task": "cwe", "length": 4096, "index": 7, "score": 100.0, ...})
    store.finish()

The file's first line holds the run's settings (model, tokenizer, seed, scoring, prompt
template, fill, haystack hash, ...: whatever decides a sample's prompt and score); resuming with
other settings is refused, naming the ones that differ. Each later line is one sample, written
and flushed at once (a line cut by a crash is ignored on reading); the last line of a finished
run says so. A new run in a directory holding an unfinished one needs --resume (continue) or
--overwrite (start again), so hours of work are not thrown away by accident. Lengths, tasks and
the number of samples may change on resume: samples are keyed by (task, length, index), and
sample i does not depend on how many are drawn.
"""

from __future__ import annotations

import json
import os
from typing import Any

SAMPLES_FILE = "samples.jsonl"
FINISHED = {"event": "finished"}


def read_log(path: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]], bool]:
    """(settings, sample records, finished) of a samples.jsonl; torn lines are skipped."""
    settings, records, finished = None, [], False
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a crash cut short
                if not isinstance(entry, dict):
                    continue
                if "settings" in entry and settings is None:
                    settings = entry["settings"]
                elif entry == FINISHED:
                    finished = True
                elif "task" in entry:
                    records.append(entry)
    except FileNotFoundError:
        pass
    return settings, records, finished


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class RunStore:
    """The samples of one run, read back on resume and appended as they are scored."""

    def __init__(
        self,
        output_dir: str,
        settings: dict[str, Any],
        resume: bool = False,
        overwrite: bool = False,
        writer: bool = True,
    ) -> None:
        self.path = os.path.join(output_dir, SAMPLES_FILE)
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the file
        self.writer = writer
        self.done: dict[tuple[str, int, int], dict[str, Any]] = {}
        previous, records, finished = read_log(self.path)
        if resume:
            if previous is None:
                raise ValueError(f"--resume: {self.path} holds no earlier run to continue")
            differing = sorted(
                key for key in set(previous) | set(self.settings) if previous.get(key) != self.settings.get(key)
            )
            if differing:
                raise ValueError(
                    f"--resume: the run in {output_dir} used other settings ({', '.join(differing)}): "
                    "resume with the same options, or use another --output-dir"
                )
            self.done = {(r["task"], int(r["length"]), int(r["index"])): r for r in records}
        elif previous is not None and not finished and records and not overwrite:
            raise ValueError(
                f"{output_dir} holds an unfinished evaluation ({len(records)} samples scored): pass --resume "
                "to continue it, --overwrite to start again, or another --output-dir"
            )
        self._handle = None
        _barrier()  # every rank has read the file before rank 0 rewrites it
        if writer:
            os.makedirs(output_dir, exist_ok=True)
            if resume:
                self._handle = open(self.path, "a", encoding="utf-8")
                self._handle.write("\n")  # closes a line a crash may have cut short
            else:
                self._handle = open(self.path, "w", encoding="utf-8")
                self._write({"settings": self.settings})

    @property
    def resumed(self) -> int:
        return len(self.done)

    def _write(self, entry: dict[str, Any]) -> None:
        assert self._handle is not None
        self._handle.write(json.dumps(entry) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def get(self, task: str, length: int, index: int) -> dict[str, Any] | None:
        return self.done.get((task, length, index))

    def add(self, record: dict[str, Any]) -> None:
        self.done[(record["task"], int(record["length"]), int(record["index"]))] = record
        if self._handle is not None:
            self._write(record)

    def finish(self) -> None:
        if self._handle is not None:
            self._write(FINISHED)
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
