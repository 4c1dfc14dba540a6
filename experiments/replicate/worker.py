"""Run several `pretrain_harpe.py` / `tools/evaluate.py` invocations one after another in one
Python process, so torch and megatron-core are imported once instead of once per run (about
15 s per run on a busy 2-core machine, more than a smoke run's training).

    python experiments/replicate/worker.py jobs.json

jobs.json: a list of {"name", "command" (the argv a user would type, starting with the python
executable and the script; a command starting with anything else, e.g. torchrun, runs as its
own process), "log", "marker"}. Each job's output goes to its log; its marker
file is written when it succeeds; jobs whose marker exists are skipped. The exit status is 1
if any job failed (the others still run). A progress line per job goes to stdout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def load_script(path: Path) -> ModuleType:
    """Import an entry-point script (pretrain_harpe.py, tools/evaluate.py) as a module."""
    spec = importlib.util.spec_from_file_location(f"replicate_entry_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_job(job: dict, scripts: dict[str, ModuleType]) -> bool:
    if job["command"][0] != sys.executable:  # a launcher (torchrun): run it as its own process
        Path(job["log"]).parent.mkdir(parents=True, exist_ok=True)
        with open(job["log"], "w") as log:
            ok = subprocess.run(job["command"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode == 0
        if ok:
            Path(job["marker"]).parent.mkdir(parents=True, exist_ok=True)
            Path(job["marker"]).touch()
        return ok
    script = Path(job["command"][1])
    module = scripts.setdefault(str(script), load_script(script))
    Path(job["log"]).parent.mkdir(parents=True, exist_ok=True)
    with open(job["log"], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            status = module.main(job["command"][2:])
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
        except Exception:  # a failed run is reported and the worker goes on with the next job
            traceback.print_exc()
            status = 1
    if status == 0:
        Path(job["marker"]).parent.mkdir(parents=True, exist_ok=True)
        Path(job["marker"]).touch()
    return status == 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: worker.py jobs.json")
    jobs = json.loads(Path(args[0]).read_text())
    scripts: dict[str, ModuleType] = {}
    failures = 0
    for job in jobs:
        if Path(job["marker"]).exists():
            continue
        began = time.time()
        ok = run_job(job, scripts)
        failures += not ok
        print(f"{'done' if ok else 'FAILED'} {job['name']} {time.time() - began:.0f}s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
