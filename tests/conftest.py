"""Pico models for every family, built on the fly (never downloaded)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mergekit_lite.pico import build_pico_model  # noqa: E402

DENSE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="session")
def pico_factory(tmp_path_factory):
    """Build (and cache for the session) a pico dense model: pico_factory(family, **options) -> path."""
    cache: dict[tuple, object] = {}

    def make(family: str = "llama", **kw):
        key = (family, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in cache:
            name = family + "-" + "-".join(f"{k}{v}" for k, v in key[1])
            cache[key] = build_pico_model(family, tmp_path_factory.mktemp(name[:60]), **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def pico_llama(pico_factory):
    return pico_factory("llama")


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Fail the test if any model's weights are loaded (every command loads them through verify.load_model)."""
    import mergekit_lite.verify as verify

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(verify, "load_model", refuse)
