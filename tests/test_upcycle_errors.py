"""Bad input gets a clear error and nothing is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

from mergekit_lite.errors import MoemergeError
from mergekit_lite.ops.upcycle import run_upcycle


def recipe(tmp_path: Path, text: str | None = None, **fields) -> Path:
    path = tmp_path / "recipe.yaml"
    if text is None:
        body = {"num_experts": 4, "experts_per_token": 2, "dtype": "float32", **fields}
        text = yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in body.items()})
    path.write_text(text)
    return path


def assert_fails(tmp_path: Path, recipe_path: Path, *needles: str, output: Path | None = None) -> str:
    out = output or tmp_path / "out"
    existed = out.exists()
    with pytest.raises(MoemergeError) as exc:
        run_upcycle(recipe_path, out, echo=lambda s: None)
    msg = str(exc.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert out.exists() == existed, "a failed run must not create the output folder"
    assert not list(out.parent.glob(f".{out.name}.moemerge-tmp-*")), "temporary folder left behind"
    return msg


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_malformed_yaml(tmp_path):
    assert_fails(tmp_path, recipe(tmp_path, "source: x\nnum_experts: [4\n"), "not valid YAML", "line")


def test_unknown_key_suggests_fix(tmp_path, pico_llama):
    msg = assert_fails(tmp_path, recipe(tmp_path, source=pico_llama, num_expert=4), "num_expert", "unknown key")
    assert "did you mean 'num_experts'" in msg


def test_unknown_nested_key(tmp_path, pico_llama):
    msg = assert_fails(tmp_path, recipe(tmp_path, source=pico_llama, router={"inti": "random"}), "router.inti")
    assert "did you mean 'init'" in msg


def test_wrong_type_names_field_and_value(tmp_path, pico_llama):
    assert_fails(tmp_path, recipe(tmp_path, source=pico_llama, num_experts="eight"), "num_experts", "'eight'")


def test_bad_literal(tmp_path, pico_llama):
    assert_fails(tmp_path, recipe(tmp_path, source=pico_llama, architecture="deepseek"), "architecture", "mixtral")


def test_topk_larger_than_experts(tmp_path, pico_llama):
    assert_fails(tmp_path, recipe(tmp_path, source=pico_llama, num_experts=2, experts_per_token=3),
                 "experts_per_token=3", "at most 2")


def test_unsupported_architecture(tmp_path, pico_llama):
    src = copy_model(pico_llama, tmp_path / "gpt")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    assert_fails(tmp_path, recipe(tmp_path, source=src), "'gpt2' is not supported")


def test_gemma3_has_no_moe_target(tmp_path, pico_factory):
    assert_fails(tmp_path, recipe(tmp_path, source=pico_factory("gemma3_text")), "no native", "graft")


@pytest.mark.parametrize("family,target,needle", [
    ("qwen3", "mixtral", "q_norm/k_norm would be lost"),
    ("qwen2", "mixtral", "biases would be lost"),
    ("llama", "qwen3_moe", "q_norm/k_norm"),
])
def test_lossy_pairs_refused(tmp_path, pico_factory, family, target, needle):
    assert_fails(tmp_path, recipe(tmp_path, source=pico_factory(family), architecture=target), needle, "auto")


@pytest.mark.parametrize("target", ["mixtral", "qwen2_moe"])
def test_llama_attention_bias_refused(tmp_path, pico_factory, target):
    # Mixtral has no attention biases; Qwen2-MoE has q/k/v biases but none on o_proj.
    src = pico_factory("llama", attention_bias=True)
    assert_fails(tmp_path, recipe(tmp_path, source=src, architecture=target), "has no place for", "_proj.bias")


def _rewrite(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    copy_model(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_tensor(tmp_path, pico_llama):
    src = _rewrite(pico_llama, tmp_path / "m", lambda sd: sd.pop("model.layers.2.mlp.up_proj.weight"))
    assert_fails(tmp_path, recipe(tmp_path, source=src), "model.layers.2.mlp.up_proj.weight", "missing")


def test_misshaped_tensor(tmp_path, pico_llama):
    def edit(sd):
        sd["model.layers.1.mlp.down_proj.weight"] = sd["model.layers.1.mlp.down_proj.weight"][:, :100].contiguous()
    src = _rewrite(pico_llama, tmp_path / "m", edit)
    assert_fails(tmp_path, recipe(tmp_path, source=src), "model.layers.1.mlp.down_proj.weight", "[64, 100]", "[64, 128]")


def test_a_transposed_gate_is_blamed_on_the_gate(tmp_path, pico_llama):
    """Layer 0's gate used to set the expected sizes, so a transposed gate blamed up_proj with swapped sizes."""
    def edit(sd):
        sd["model.layers.0.mlp.gate_proj.weight"] = sd["model.layers.0.mlp.gate_proj.weight"].t().contiguous()
    src = _rewrite(pico_llama, tmp_path / "m", edit)
    assert_fails(tmp_path, recipe(tmp_path, source=src), "model.layers.0.mlp.gate_proj.weight", "[64, 128]",
                 "expected [128, 64] (transposed?)", "from config.json")


def test_truncated_safetensors(tmp_path, pico_llama):
    src = copy_model(pico_llama, tmp_path / "t")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_fails(tmp_path, recipe(tmp_path, source=src), "truncated or corrupt")


def test_corrupt_header(tmp_path, pico_llama):
    src = copy_model(pico_llama, tmp_path / "c")
    data = bytearray((src / "model.safetensors").read_bytes())
    data[10:20] = b"\xff" * 10
    (src / "model.safetensors").write_bytes(bytes(data))
    assert_fails(tmp_path, recipe(tmp_path, source=src), "model.safetensors")


def test_missing_shard_named_in_index(tmp_path, pico_factory):
    src = copy_model(pico_factory("llama", max_shard_size="40KB"), tmp_path / "s")
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert_fails(tmp_path, recipe(tmp_path, source=src), victim.name, "missing")


def test_folder_without_config(tmp_path, pico_llama):
    src = copy_model(pico_llama, tmp_path / "nc")
    (src / "config.json").unlink()
    assert_fails(tmp_path, recipe(tmp_path, source=src), "no config.json")


def test_missing_source_folder(tmp_path):
    assert_fails(tmp_path, recipe(tmp_path, source=tmp_path / "nowhere"), "not found")


def test_malicious_bin_refused(tmp_path, pico_llama):
    src = tmp_path / "evil"
    src.mkdir()
    shutil.copy(pico_llama / "config.json", src / "config.json")
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Boom()}))
    assert_fails(tmp_path, recipe(tmp_path, source=src), "weights_only=True")


def test_output_exists(tmp_path, pico_llama):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_fails(tmp_path, recipe(tmp_path, source=pico_llama), "already exists", "--overwrite", output=out)
    assert (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces(tmp_path, pico_llama):
    out = tmp_path / "out"
    run_upcycle(recipe(tmp_path, source=pico_llama), out, echo=lambda s: None)
    (out / "model-00002-of-00002.safetensors").write_text("old")  # a shard of an earlier, sharded build,
    record = json.loads((out / "moemerge.json").read_text())  # which recorded it as its own
    record["written"]["model-00002-of-00002.safetensors"] = 3
    (out / "moemerge.json").write_text(json.dumps(record))
    run_upcycle(recipe(tmp_path, source=pico_llama), out, overwrite=True, echo=lambda s: None)
    assert not (out / "model-00002-of-00002.safetensors").exists() and (out / "model.safetensors").exists()


def test_disk_too_small(tmp_path, pico_llama, monkeypatch):
    import mergekit_lite.io.writer as writer

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    assert_fails(tmp_path, recipe(tmp_path, source=pico_llama), "not enough free disk")


def test_crash_mid_write_leaves_nothing(tmp_path, pico_llama, monkeypatch):
    import mergekit_lite.io.writer as writer

    calls = {"n": 0}
    real = writer.TensorPool.open

    def flaky(self, path, header, n_tensors):  # the second shard file is being opened
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # what Ctrl-C looks like mid-run
        return real(self, path, header, n_tensors)

    monkeypatch.setattr(writer.TensorPool, "open", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_upcycle(recipe(tmp_path, source=pico_llama, shard_size="100KB"), out, echo=lambda s: None)
    assert calls["n"] == 2
    assert not out.exists() and not list(tmp_path.glob(".out.moemerge-tmp-*"))


def test_no_output_given(tmp_path, pico_llama):
    with pytest.raises(MoemergeError, match="-o/--output"):
        run_upcycle(recipe(tmp_path, source=pico_llama), None, echo=lambda s: None)


def test_cli_one_line_error_no_traceback(tmp_path, pico_llama):
    r = recipe(tmp_path, source=pico_llama, num_experts=2, experts_per_token=5)
    proc = subprocess.run([sys.executable, "-m", "mergekit_lite", "upcycle", str(r), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "experts_per_token" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_quantized_source_refused(tmp_path, pico_llama):
    src = copy_model(pico_llama, tmp_path / "q")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (src / "config.json").write_text(json.dumps(cfg))
    assert_fails(tmp_path, recipe(tmp_path, source=src), "quantized checkpoint", "bitsandbytes")
