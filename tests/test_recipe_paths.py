"""One rule for a recipe's relative paths, for every command: from the working directory, else from the recipe."""

from __future__ import annotations

from mergekit_lite.recipe import TrainRecipe, validate_recipe
from mergekit_lite.recipe.paths import resolve_relative, resolve_train_paths


def _train_recipe(model: str, train: list[str], validation: list[str] | None = None) -> TrainRecipe:
    body = {"model": model, "data": {"train": train, **({"validation": validation} if validation else {})},
            "seq_len": 8, "micro_batch_size": 1, "max_steps": 1, "learning_rate": 1e-3, "output": "run"}
    return validate_recipe(body, TrainRecipe)


def test_relative_paths_prefer_the_working_directory_then_the_recipe(tmp_path, monkeypatch):
    recipes, cwd = tmp_path / "recipes", tmp_path / "cwd"
    for d in (recipes / "model", recipes / "data", cwd / "model"):
        d.mkdir(parents=True)
    (recipes / "data" / "a.txt").write_text("x\n")
    monkeypatch.chdir(cwd)
    recipe = recipes / "r.yaml"
    assert resolve_relative("model", recipe) == "model"  # exists here: kept as written
    assert resolve_relative("data/a.txt", recipe) == str(recipes / "data" / "a.txt")
    assert resolve_relative("data/*.txt", recipe) == str(recipes / "data" / "*.txt")  # a glob matching there
    assert resolve_relative(str(tmp_path / "nowhere"), recipe) == str(tmp_path / "nowhere")  # absolute: unchanged
    assert resolve_relative("org/name", recipe) == "org/name"  # a Hub id: unchanged


def test_train_recipe_model_and_data_resolve_like_upcycle_source(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    (recipes / "model").mkdir(parents=True)
    (recipes / "train.txt").write_text("x\n")
    (recipes / "val.txt").write_text("y\n")
    monkeypatch.chdir(tmp_path)
    r = resolve_train_paths(_train_recipe("model", ["train.txt"], ["val.txt"]), recipes / "r.yaml")
    assert r.model == str(recipes / "model")
    assert r.data.train == [str(recipes / "train.txt")] and r.data.validation == [str(recipes / "val.txt")]
    assert r.output == "run"  # the output stays relative to the working directory
    absolute = _train_recipe(str(recipes / "model"), [str(recipes / "train.txt")])
    assert resolve_train_paths(absolute, tmp_path / "other" / "r.yaml") == absolute
