"""Compatibility matrix: the conversion / export / evaluation tests against several transformers.

Each transformers version gets a venv under the cache dir, layered on the environment running
this script (the locked set of `requirements/lock.txt`): a `.pth` file makes that environment's
packages visible, and only transformers (plus whatever that version needs in other versions, e.g.
huggingface_hub, and the `kernels` its release names) is installed on top, from pip's wheel cache
after the first time. The version already installed here runs in place. Versions the HARPE export refuses
(`megatron_harpe/convert/hf_harpe/configuration_harpe_llama.py`: below the minimum or excluded)
run only the tests proving that loading an export there fails with a message naming the version
and the supported range.

    python scripts/compat_matrix.py                                   # the ends: minimum and newest on PyPI
    python scripts/compat_matrix.py --versions 5.0.0 5.3.0 5.24.0 --part full
    python scripts/compat_matrix.py --versions minimum tested --cache-dir /tmp/compat-envs

Exit code 0 only if every version passed (a version whose tests ran nothing fails).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"
PARTS = {
    # what CI runs at both ends of the range: the exported model through trust_remote_code, and the CLI
    "export": [
        "tests/unit/test_hf_harpe_remote_code.py",
        "tests/unit/test_convert_hf_harpe.py",
        "tests/unit/test_convert_hf_config.py",
        "tests/e2e/test_convert_cli.py",
    ],
    # everything that touches transformers: conversion both ways, the HF evaluation backend
    "full": [
        "tests/unit/test_hf_harpe_remote_code.py",
        "tests/unit/test_convert_hf_harpe.py",
        "tests/unit/test_convert_hf_config.py",
        "tests/unit/test_convert_inputs.py",
        "tests/unit/test_convert_keymap.py",
        "tests/unit/test_eval_hf_backend.py",
        "tests/e2e/test_convert_cli.py",
        "tests/e2e/test_evaluate_cli.py",
        "tests/distributed/test_convert.py",
        "tests/distributed/test_verify_cache.py",
    ],
}
REFUSED_PART = ["tests/unit/test_hf_harpe_remote_code.py"]


@dataclass
class Outcome:
    version: str
    supported: bool
    passed: bool
    summary: str
    seconds: float


def _range_module():
    sys.path.insert(0, str(REPO))
    from megatron_harpe.convert.hf_harpe import configuration_harpe_llama

    return configuration_harpe_llama


def declared_range() -> str:
    """The transformers specifier of pyproject.toml's dependencies (e.g. ">=5.4,<5.25")."""
    import tomllib

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in dependencies:
        match = re.fullmatch(r"transformers\s*([<>=!~].*)?", requirement.strip())
        if match:
            return (match.group(1) or "").strip()
    raise SystemExit("error: pyproject.toml declares no transformers dependency")


def newest_in_range(index_listing: str, specifier: str) -> tuple[str | None, str | None]:
    """(newest release in `specifier`, newest release of all) from `pip index versions` output:
    the upper end of the range is what a user resolves, so that is the version to test."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    match = re.search(r"^Available versions: (.+)$", index_listing, re.MULTILINE)
    versions = []
    for text in match.group(1).split(",") if match else []:
        try:
            versions.append(Version(text.strip()))
        except InvalidVersion:
            continue
    releases = [version for version in versions if not version.is_prerelease]
    allowed = [version for version in releases if version in SpecifierSet(specifier)]
    return (str(max(allowed)) if allowed else None), (str(max(releases)) if releases else None)


def newest_on_index() -> str | None:
    """The newest transformers release on the index that pyproject.toml's range admits (one
    `pip index` look-up); a newer release outside the range is named, not tested."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "transformers", "--disable-pip-version-check"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    specifier = declared_range()
    newest, newest_of_all = newest_in_range(result.stdout, specifier)
    if newest_of_all and newest_of_all != newest:
        print(
            f"compat matrix: transformers {newest_of_all} is on the index but outside pyproject.toml's range "
            f"({specifier}): not tested",
            flush=True,
        )
    return newest


def resolve_versions(names: list[str]) -> list[str]:
    policy = _range_module()
    resolved = []
    for name in names:
        if name == "minimum":
            name = policy.TRANSFORMERS_MINIMUM
        elif name == "tested":
            name = policy.TRANSFORMERS_TESTED_UP_TO
        elif name == "newest":
            name = newest_on_index() or policy.TRANSFORMERS_TESTED_UP_TO
        if name not in resolved:
            resolved.append(name)
    return resolved


def _requirement(version: str) -> str:
    return f"transformers[kernels]=={version}"


def _stamp(version: str) -> str:
    lock = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16] if LOCK.is_file() else "no-lock"
    return json.dumps({"requirement": _requirement(version), "base": sys.prefix, "lock": lock})


def layered_env(version: str, cache_dir: Path) -> Path:
    """A venv seeing this environment's packages, with transformers==version installed on top."""
    env = cache_dir / f"transformers-{version}"
    stamp = env / "compat-stamp.json"
    if stamp.is_file() and stamp.read_text() == _stamp(version):
        return env
    shutil.rmtree(env, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    child_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    parent_sites = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    # site.addsitedir (not a bare path) so the parent's own .pth files (editable installs) apply too
    lines = [f"import site; site.addsitedir({site!r})" for site in parent_sites]
    Path(child_site, "zz_compat_parent.pth").write_text("\n".join(lines) + "\n")
    # with the `kernels` its release names: the locked transformers pulls in a newer kernels, whose
    # API older releases fail on at import ("Either a revision or a version must be specified")
    install = [str(python), "-m", "pip", "install", "-qq", "--disable-pip-version-check", _requirement(version)]
    subprocess.run(install, check=True)
    stamp.write_text(_stamp(version))
    return env


def run_tests(python: Path, files: list[str], extra: list[str]) -> tuple[bool, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *extra],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    lines = [line for line in result.stdout.strip().splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else "(no output)"
    if result.returncode != 0:
        print(result.stdout[-6000:], result.stderr[-3000:], sep="\n", file=sys.stderr)
    # exit code 5 (no tests collected) counts as failure: a matrix entry that ran nothing proves nothing
    return result.returncode == 0, summary


def run_version(version: str, part: str, cache_dir: Path, extra: list[str]) -> Outcome:
    import transformers

    policy = _range_module()
    start = time.monotonic()
    supported = policy.is_supported(version)
    if version == transformers.__version__:
        python = Path(sys.executable)
    else:
        try:
            python = layered_env(version, cache_dir) / "bin" / "python"
        except subprocess.CalledProcessError as error:
            return Outcome(version, supported, False, f"could not build its venv: {error}", time.monotonic() - start)
    passed, summary = run_tests(python, PARTS[part] if supported else REFUSED_PART, extra)
    return Outcome(version, supported, passed, summary, time.monotonic() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--versions", nargs="+", default=["minimum", "newest"],
        help="transformers versions; also 'minimum', 'tested' (newest tested) and 'newest' (newest on the index)",
    )  # fmt: skip
    parser.add_argument("--part", choices=sorted(PARTS), default="export", help="which tests (see PARTS)")
    parser.add_argument(
        "--cache-dir", type=Path,
        default=Path(os.environ.get("COMPAT_CACHE_DIR", Path.home() / ".cache" / "megatron_harpe" / "compat")),
        help="where the per-version venvs are kept and reused (env COMPAT_CACHE_DIR)",
    )  # fmt: skip
    parser.add_argument(
        "--skip-installed", action="store_true",
        help="leave out the transformers installed here (CI: the whole suite just ran on it)",
    )  # fmt: skip
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    import transformers

    policy = _range_module()
    versions = resolve_versions(args.versions)
    if args.skip_installed and transformers.__version__ in versions:
        print(f"compat matrix: transformers {transformers.__version__} is installed here: covered by the suite run")
        versions.remove(transformers.__version__)
    print(f"compat matrix: transformers {', '.join(versions)}; supported range {policy.supported_range()}", flush=True)
    outcomes = []
    for version in versions:
        outcome = run_version(version, args.part, args.cache_dir, args.pytest_args)
        status = "ok" if outcome.passed else "FAILED"
        role = f"{args.part} tests" if outcome.supported else "refused, refusal tests"
        print(f"transformers {version:>8} ({role}): {status}: {outcome.summary} [{outcome.seconds:.0f} s]", flush=True)
        outcomes.append(outcome)
    failed = [o.version for o in outcomes if not o.passed]
    print("compat matrix: " + (f"FAILED for transformers {', '.join(failed)}" if failed else "all versions passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
