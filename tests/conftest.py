"""Shared fixtures: a tiny Llama and tokenizer built locally, and small tokenised datasets."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
# `make test` runs one pytest worker per core (pytest-xdist): one thread each then, two otherwise
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from booster.models import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Converted models and judges go to a per-session temp cache, never the user's."""
    if "BOOSTER_CACHE" not in os.environ:
        monkeypatch.setenv("BOOSTER_CACHE", str(tmp_path_factory.getbasetemp() / "booster-cache"))
