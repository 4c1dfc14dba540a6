"""Shared fixtures: the offline demo dataset, prepared once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """Corpus -> sentencepiece tokenizer -> upsampled Megatron dataset (about 20 s once)."""
    from megatron_harpe.data.demo_corpus import prepare_demo_data

    return prepare_demo_data(tmp_path_factory.mktemp("demo_data"))
