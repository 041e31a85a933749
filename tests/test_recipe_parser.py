"""Recipes a careless or hostile file cannot turn into a hang, a silent setting or a traceback (issue 23, item 4)."""

from __future__ import annotations

import time

import pytest

from mergekit_lite.errors import MoemergeError
from mergekit_lite.recipe import TrainRecipe, UpcycleRecipe, load_recipe

TRAIN = """model: m
data: {train: [a.txt]}
seq_len: 32
micro_batch_size: 2
max_steps: 2
learning_rate: 1.0e-3
output: out
"""
UPCYCLE = "source: m\nnum_experts: 4\nexperts_per_token: 2\n"


def load(tmp_path, text: str | bytes, model=TrainRecipe):
    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return load_recipe(path, model)


def test_an_alias_bomb_is_refused_at_once_in_one_short_line(tmp_path):
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]" for p, c in zip("abcdef", "bcdefg")]
    start = time.perf_counter()
    with pytest.raises(MoemergeError) as e:
        load(tmp_path, TRAIN + "\n".join(levels) + "\n")
    assert time.perf_counter() - start < 5
    msg = str(e.value)
    assert "expands to 6,053,453 values through its aliases" in msg and "\n" not in msg and len(msg) < 300, msg


def test_a_small_alias_as_pyyaml_itself_writes_them_is_fine(tmp_path):
    import yaml

    shared = ["q_proj", "v_proj"]
    body = yaml.safe_load(TRAIN) | {"lora": {"target_modules": shared}, "data": {"train": shared}}
    text = yaml.safe_dump(body)
    assert "*id001" in text  # PyYAML anchors a value it meets twice
    assert load(tmp_path, text).lora.target_modules == ["q_proj", "v_proj"]


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    with pytest.raises(MoemergeError, match=r"at line 8.*key 'learning_rate' is given twice \(first at line 6\)"):
        load(tmp_path, TRAIN + "learning_rate: 1.0\n")


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    with pytest.raises(MoemergeError, match=r"is not UTF-8 text \(byte 7: invalid continuation byte\); save it as UTF-8"):
        load(tmp_path, b"model: \xe9t\xe9\n" + TRAIN.encode()[9:])


def test_yaml_11_no_is_the_documented_default_and_a_single_file_is_a_list(tmp_path):
    r = load(tmp_path, TRAIN.replace("data: {train: [a.txt]}", "data: {train: a.txt, validation: b.txt}")
             + "mixed_precision: no\n")
    assert r.mixed_precision == "no" and r.data.train == ["a.txt"] and r.data.validation == ["b.txt"]


@pytest.mark.parametrize("line, field", [
    ("noise: .inf", "noise"), ("noise: .nan", "noise"), ("noise: 1.0e+308", "noise"),
    ("router: {init: uniform, bound: .inf}", "router.bound"), ("num_experts: 1000000000", "num_experts")])
def test_numbers_are_finite_and_bounded_before_any_plan(tmp_path, line, field):
    text = UPCYCLE.replace("num_experts: 4\n", "") + line + "\n"
    if "num_experts" not in line:
        text += "num_experts: 4\n"
    with pytest.raises(MoemergeError, match=rf"\n  {field} = "):
        load(tmp_path, text, UpcycleRecipe)


def test_errors_echo_only_an_excerpt_of_a_value(tmp_path):
    with pytest.raises(MoemergeError) as e:
        load(tmp_path, TRAIN.replace("seq_len: 32", "seq_len: " + "9" * 5000 + "x"))
    assert len(str(e.value)) < 600 and "..." in str(e.value)
