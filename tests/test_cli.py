"""The command line as a user meets it: help, dry run, inspect, verify, offline Hub ids."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from mergekit_lite.cli import app
from mergekit_lite.errors import MoemergeError
from mergekit_lite.inspect_model import describe
from mergekit_lite.ops.upcycle import run_upcycle

runner = CliRunner()


def _recipe(tmp_path, source, **kw):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"source": str(source), "num_experts": 4, "experts_per_token": 2, **kw}))
    return p


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("upcycle", "verify", "inspect", "quickstart"):
        assert cmd in result.output


def test_upcycle_help_names_every_target_of_the_family_table():
    from mergekit_lite.arch.tables import MOE

    result = runner.invoke(app, ["upcycle", "--help"], terminal_width=400)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for fam in MOE.values():
        name = "architecture: moemerge" if fam.nests_text_config else fam.architecture.removesuffix("ForCausalLM")
        assert name in text, name


def test_dry_run_via_cli(tmp_path, pico_llama):
    result = runner.invoke(app, ["upcycle", str(_recipe(tmp_path, pico_llama)), "-o", str(tmp_path / "o"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "MixtralForCausalLM" in result.output and "active per token" in result.output
    assert not (tmp_path / "o").exists()


def test_output_field_and_cli_override(tmp_path, pico_llama):
    r = _recipe(tmp_path, pico_llama, output=str(tmp_path / "from-recipe"))
    assert runner.invoke(app, ["upcycle", str(r)]).exit_code == 0
    assert (tmp_path / "from-recipe" / "config.json").exists()
    assert runner.invoke(app, ["upcycle", str(r), "-o", str(tmp_path / "from-cli")]).exit_code == 0
    assert (tmp_path / "from-cli" / "config.json").exists()


def test_inspect_and_verify(tmp_path, pico_llama):
    out = tmp_path / "moe"
    plan = run_upcycle(_recipe(tmp_path, pico_llama, dtype="float32"), out, echo=lambda s: None)
    d = describe(out)
    assert (d["experts"], d["experts_per_token"], d["layers"]) == (4, 2, 4)
    assert d["total_params"] == plan.total_params and d["active_params"] == plan.active_params
    assert d["built_by"]["kind"] == "upcycle"
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0 and "top-2" in result.output
    result = runner.invoke(app, ["verify", str(out), "--against", str(pico_llama), "--device", "cpu",
                                 "--tolerance", "1e-4"])
    assert result.exit_code == 0, result.output
    assert "top-1 agreement 100.00%" in result.output
    parity = describe(out)["built_by"]["parity"]
    assert parity["max_abs"] <= 1e-4 and parity["top1_agreement"] == 1.0
    assert "## Step-0 parity" in (out / "README.md").read_text()


def test_verify_against_another_model_records_nothing_unless_asked(tmp_path, pico_llama, pico_factory):
    out = tmp_path / "moe"
    run_upcycle(_recipe(tmp_path, pico_llama, dtype="float32"), out, echo=lambda s: None)
    other = pico_factory("llama", seed=5)  # a mistaken comparison: same shapes, unrelated weights
    before = (out / "moemerge.json").read_text(), (out / "README.md").read_text()
    result = runner.invoke(app, ["verify", str(out), "--against", str(other), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "not recorded:" in result.output and "pass --record to store the figures anyway" in result.output
    assert ((out / "moemerge.json").read_text(), (out / "README.md").read_text()) == before
    result = runner.invoke(app, ["verify", str(out), "--against", str(other), "--device", "cpu", "--record"])
    assert result.exit_code == 0 and "recorded in" in result.output
    assert describe(out)["built_by"]["parity"]["against"] == str(other)


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = _recipe(tmp_path, "no-such-org/no-such-model")
    try:
        run_upcycle(r, tmp_path / "o", echo=lambda s: None)
    except MoemergeError as e:
        assert "could not be fetched from the Hugging Face Hub" in str(e)
    else:
        raise AssertionError("expected a MoemergeError")
    assert not (tmp_path / "o").exists()


def test_non_power_of_two_experts_warns(tmp_path, pico_llama):
    lines: list[str] = []
    run_upcycle(_recipe(tmp_path, pico_llama, num_experts=6), None, dry_run=True, echo=lines.append)
    assert any("not a power of two" in line and "llama.cpp" in line for line in lines)


LIGHT = """
import sys
from mergekit_lite.cli import main
sys.argv = ["moemerge", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    code = e.code
heavy = any(m in sys.modules for m in ("torch", "transformers", "datasets"))
print("torch imported:", heavy, "exit:", code)
"""


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["--version"], 0), (["upcycle", "--help"], 0),
                                        (["train", "--help"], 0), (["upcycle", "BAD"], 2), (["train", "BAD"], 2)])
def test_help_version_and_recipe_errors_answer_without_importing_torch_transformers_or_datasets(tmp_path, args, code):
    (tmp_path / "bad.yaml").write_text("source: x\nnum_experts: 4\nexperts_per_tok: 2\n")
    args = [str(tmp_path / "bad.yaml") if a == "BAD" else a for a in args]
    proc = subprocess.run([sys.executable, "-c", LIGHT, *args], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().endswith(f"torch imported: False exit: {code}"), proc.stdout[-500:] + proc.stderr[-500:]
    if args[0] == "--version":
        assert proc.stdout.startswith("moemerge 0.1.0")


UPCYCLE_IMPORTS = """
import sys
from mergekit_lite.cli import main
sys.argv = ["moemerge", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
model_code = [m for m in ("transformers.modeling_utils", "mergekit_lite.models.moemerge.modeling_moemerge",
                          "deepspeed") if m in sys.modules]
print("model code imported:", model_code)
"""


def test_upcycle_imports_no_model_code(tmp_path, pico_llama):
    """An upcycle reads headers and configs: transformers' model machinery (and the project's own modeling code,
    which pulls it in) would only add start-up; configs are validated with the config classes alone."""
    for target in ("auto", "moemerge"):
        (tmp_path / target).mkdir()
        recipe, out = _recipe(tmp_path / target, pico_llama, architecture=target), tmp_path / target / "out"
        proc = subprocess.run([sys.executable, "-c", UPCYCLE_IMPORTS, "upcycle", str(recipe), "-o", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.stdout.strip().endswith("model code imported: []"), proc.stdout[-500:] + proc.stderr[-800:]
        assert (out / "config.json").is_file()


def test_an_error_naming_a_path_with_brackets_prints_it_as_written(tmp_path):
    weird = tmp_path / "[bold red]run[dim]"
    weird.mkdir()
    proc = subprocess.run([sys.executable, "-m", "mergekit_lite", "train", str(weird / "missing.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"recipe file not found: {weird / 'missing.yaml'}" in proc.stderr, proc.stderr


def test_os_and_decoding_errors_are_one_line_naming_the_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 1.0, "tokens": 1, "lr": 0.1}\n')
    (tmp_path / "afile").write_text("x")

    def moemerge(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mergekit_lite", *args], capture_output=True, text=True,
                              timeout=120)

    exists = moemerge("plot", str(run), "-o", str(tmp_path / "afile"))  # -o an existing file
    assert exists.returncode == 2 and exists.stderr.startswith(f"error: File exists: {tmp_path / 'afile'}")
    (run / "metrics.jsonl").write_bytes(b'{"type": "tr\xe9in"}\n')  # Latin-1 bytes
    latin = moemerge("plot", str(run))
    assert latin.returncode == 2 and "is not UTF-8 text" in latin.stderr
    for proc in (exists, latin):
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr[-2000:]


def test_one_expert_is_accepted_with_a_note(tmp_path, pico_llama):
    said: list[str] = []
    run_upcycle(_recipe(tmp_path, pico_llama, num_experts=1, experts_per_token=1), tmp_path / "one",
                echo=said.append)
    assert any("num_experts: 1: every token goes to the one expert" in s for s in said), said


@pytest.mark.parametrize("kind", ["MoemergeError", "PeerWaitError"])
def test_a_waiting_process_says_why_it_gave_up_though_it_is_not_rank_0(kind):
    """Errors print once per machine (LOCAL_RANK 0), except a process giving up on another: it alone knows why.
    It then leaves with os._exit (a normal exit after a timed-out gloo collective aborts with a core dump)."""
    code = ("import atexit, mergekit_lite.cli as c, mergekit_lite.errors as e\n"
            "atexit.register(lambda: print('ATEXIT'))\n"
            f"def boom(): raise e.{kind}('process 1 waited for the main process')\n"
            "c.app = boom\nc.main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LOCAL_RANK": "1"})
    assert proc.returncode == 2
    peer = kind == "PeerWaitError"
    assert ("error: process 1 waited for the main process" in proc.stderr) is peer
    assert ("ATEXIT" in proc.stdout) is not peer  # left at once: no interpreter shutdown
