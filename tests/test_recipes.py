"""Every shipped recipe validates against the one schema, and the schema's errors are useful."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergekit_lite import recipe as schema
from mergekit_lite.errors import MoemergeError
from mergekit_lite.recipe import UpcycleRecipe, load_recipe, parse_size, validate_recipe

ROOT = Path(__file__).resolve().parents[1] / "recipes"
SCHEMAS = {"upcycle": "UpcycleRecipe", "graft": "GraftRecipe", "train": "TrainRecipe", "ensemble": "EnsembleRecipe"}
SHIPPED = sorted(p for p in ROOT.rglob("*.yaml") if p.parent.name in SCHEMAS)


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_shipped_recipe_validates(path):
    model = getattr(schema, SCHEMAS[path.parent.name])
    load_recipe(path, model)
    assert path.read_text().startswith("#"), "every recipe opens with a comment header"


def test_accelerate_configs_parse():
    for p in sorted((ROOT / "accelerate").glob("*.yaml")):
        assert isinstance(yaml.safe_load(p.read_text()), dict), p


def test_issue_minimal_upcycle_recipe_is_valid():
    r = validate_recipe(yaml.safe_load("""
source: path/to/dense
architecture: mixtral
num_experts: 8
experts_per_token: 2
router: {init: random}
dtype: bfloat16
"""), UpcycleRecipe)
    assert (r.num_experts, r.experts_per_token, r.router.init, r.shard_size) == (8, 2, "random", 5 * 10**9)


@pytest.mark.parametrize("text,bytes_", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), (1024, 1024)])
def test_parse_size(text, bytes_):
    assert parse_size(text) == bytes_


def test_errors_list_every_problem():
    with pytest.raises(MoemergeError) as e:
        validate_recipe({"source": 3, "num_experts": 0, "experts_per_token": 1, "dtyp": "x"}, UpcycleRecipe, "r.yaml")
    msg = str(e.value)
    assert "num_experts = 0" in msg and "greater than or equal to 1" in msg
    assert "dtyp" in msg and "did you mean 'dtype'" in msg
    assert "source = 3" in msg


def test_bad_shard_size():
    with pytest.raises(MoemergeError, match="shard_size"):
        validate_recipe({"source": "x", "num_experts": 2, "experts_per_token": 1, "shard_size": "lots"}, UpcycleRecipe)
