"""Static checks of the GPU image recipe, which CI cannot build (no GPU, ~20 GB base image).

    python -m pytest tests/unit/test_launch_dockerfile.py -q

The Dockerfile must stay on NVIDIA's PyTorch base, pin the same megatron-core as pyproject.toml,
and never reinstall torch over the image's CUDA build; the build context must leave out runs,
checkpoints and data.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def test_base_image_is_ngc_pytorch() -> None:
    tag = re.search(r"^ARG NGC_TAG=(\d\d\.\d\d)$", DOCKERFILE, flags=re.MULTILINE)
    assert tag, "the NGC release is a build argument with a YY.MM default"
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\$\{NGC_TAG\}-py3$", DOCKERFILE, flags=re.MULTILINE)


def test_megatron_core_pin_matches_pyproject() -> None:
    pyproject_pin = re.search(r'"megatron-core==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    docker_pins = re.findall(r"megatron-core==([\d.]+)", DOCKERFILE)
    assert docker_pins and set(docker_pins) == {pyproject_pin}


def test_torch_is_never_reinstalled() -> None:
    pip_lines = [line for line in DOCKERFILE.splitlines() if "pip install" in line or line.startswith("        ")]
    installed = " ".join(pip_lines)
    assert not re.search(r"(?<![\w-])torch(?![\w-])", installed.replace("pytorch", "")), installed
    assert "--no-deps megatron-core" in DOCKERFILE and "--no-deps --ignore-requires-python -e ." in DOCKERFILE


def test_build_context_leaves_out_outputs() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {"runs", "ckpt", "data", ".git", "*.pt", "*.safetensors", "*.bin", "*.idx"} <= ignored
