"""`moemerge train` on the command line: `-o` wins over the recipe's `output:`, and a user error under a
launcher is printed by the local main process only (every process still exits 2)."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml
from typer.testing import CliRunner

from mergekit_lite.cli import app
from mergekit_lite.pico import build_pico_model
from mergekit_lite.train.corpus import stdlib_docstrings, write_corpus


def test_train_output_option_wins_over_recipe(tmp_path):
    train_txt, val_txt = write_corpus(tmp_path / "corpus")
    model = build_pico_model("llama", tmp_path / "dense", texts=stdlib_docstrings(), hidden_size=32,
                             intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    recipe = tmp_path / "r.yaml"
    body = {"model": str(model), "data": {"train": [str(train_txt)], "validation": [str(val_txt)]},
            "seq_len": 32, "micro_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3, "eval_batches": 1,
            "output": str(tmp_path / "from-recipe")}
    recipe.write_text(yaml.safe_dump(body))
    runner = CliRunner()
    for name in ("a", "b"):  # two runs of one recipe side by side: the second does not meet the first's run
        res = runner.invoke(app, ["train", str(recipe), "-o", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        assert (tmp_path / name / "final" / "config.json").is_file()
        assert f"model in {tmp_path / name / 'final'}" in res.output
    assert not (tmp_path / "from-recipe").exists()


def _train_missing_recipe(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergekit_lite", "train", str(tmp_path / "none.yaml")],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def test_user_error_printed_by_local_main_process_only(tmp_path):
    main, other = _train_missing_recipe(tmp_path, LOCAL_RANK="0"), _train_missing_recipe(tmp_path, LOCAL_RANK="1")
    assert (main.returncode, other.returncode) == (2, 2)
    assert main.stderr.count("error:") == 1 and "none.yaml" in main.stderr
    assert "error:" not in other.stderr and "Traceback" not in other.stderr


def test_train_recipe_paths_resolve_from_the_recipe_folder(tmp_path, monkeypatch):
    """A train recipe kept beside its model and data runs from another working directory, like upcycle's."""
    project = tmp_path / "project"
    write_corpus(project / "corpus")
    build_pico_model("llama", project / "dense", texts=stdlib_docstrings(), hidden_size=32, intermediate_size=64,
                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    body = {"model": "dense", "data": {"train": ["corpus/train.txt"], "validation": ["corpus/val*.txt"]},
            "seq_len": 32, "micro_batch_size": 2, "max_steps": 1, "learning_rate": 1e-3, "eval_batches": 1,
            "output": "run"}
    (project / "r.yaml").write_text(yaml.safe_dump(body))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = CliRunner().invoke(app, ["train", str(project / "r.yaml")])
    assert res.exit_code == 0, res.output
    assert (elsewhere / "run" / "final" / "config.json").is_file()  # output: from the working directory
    assert not (project / "run").exists()
