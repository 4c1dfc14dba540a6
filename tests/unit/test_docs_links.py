"""Every relative link of the README and docs/ reaches a file that exists, and every `#anchor`
a heading of that file (GitHub's anchor rule), so moving text between pages cannot leave a
reader at a dead link. The README stays within the size the project promises."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README_LIMIT_BYTES = 15 * 1024
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def documentation_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def github_anchor(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # punctuation goes, word characters, hyphens and spaces stay
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            found.add(github_anchor(line.lstrip("#")))
    return found


def test_github_anchor_rule():
    assert github_anchor("Check the preset's path on one node: `scripts/gpu_check.sh`") == (
        "check-the-presets-path-on-one-node-scriptsgpu_checksh"
    )
    assert github_anchor("Short-context retention (`--task short`)") == "short-context-retention---task-short"


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in documentation_files():
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(REPO)}: {target} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_stays_short():
    size = (REPO / "README.md").stat().st_size
    assert size <= README_LIMIT_BYTES, (
        f"README.md is {size} bytes, over {README_LIMIT_BYTES}: move detail to a page under docs/ and link it"
    )


def test_docs_index_lists_every_page():
    index = (REPO / "docs" / "README.md").read_text(encoding="utf-8")
    missing = [
        page.name
        for page in sorted((REPO / "docs").glob("*.md"))
        if page.name != "README.md" and f"({page.name})" not in index
    ]
    assert not missing, f"docs/README.md does not link {missing}: add a line for each page"


SETUP_DEMO = "pip install -c requirements/lock.txt torch==2.13.0 -e . && bash scripts/demo_cpu.sh"
SETUP_TESTS = 'pip install -c requirements/lock.txt torch==2.13.0 -e ".[dev]" && python -m pytest -q'


def test_readme_keeps_the_two_setup_commands_that_ci_runs():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert SETUP_DEMO in lines and SETUP_TESTS in lines, "the README's two set-up commands changed"
    assert SETUP_TESTS in (REPO / ".ci" / "run").read_text(encoding="utf-8"), (
        ".ci/run no longer runs the README's test command"
    )


PATH_ROOTS = (
    "megatron_harpe/",
    "tools/",
    "scripts/",
    "tests/",
    "benchmarks/",
    "configs/",
    "experiments/",
    "docs/",
    ".ci/",
    "requirements/",
)
OTHER_REPOSITORIES = {  # paths the pages cite in other projects' trees, by the project they name
    "tools/preprocess_data.py",  # Megatron-LM
    "tensor_parallel/mappings.py",  # megatron-core
    "tests/pytorch/distributed/run_fsdp2_model.py",  # Transformer Engine
}


def test_every_repository_path_in_inline_code_exists():
    """`megatron_harpe/eval/backends/kv_cache.py`, `scripts/gpu_check.sh`, `training/loop.py` (a path inside
    the package) ...: a file moved or renamed must take the pages' mentions with it."""
    missing = []
    for page in documentation_files():
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for span in re.findall(r"`([^`\n]+)`", line):
                path = span.strip().split("::")[0].rstrip(",.:;")
                if " " in path or re.search(r"[{}*<>\[\]]|\bX\b", path) or path in OTHER_REPOSITORIES:
                    continue
                if path.startswith(PATH_ROOTS):
                    candidates = [REPO / path]
                elif re.fullmatch(r"[a-z_]+/[\w/]*\.py", path):
                    candidates = [REPO / "megatron_harpe" / path]
                else:
                    continue
                if not any(candidate.exists() for candidate in candidates):
                    missing.append(f"{page.relative_to(REPO)}:{number}: {path}")
    assert not missing, "paths in the documentation that do not exist (moved? renamed?):\n" + "\n".join(missing)
