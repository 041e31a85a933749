"""`moemerge train`: a resumed run is the uninterrupted run, the reported losses are the saved model's,
the router tap routes as transformers does, and the aux-loss-free bias balances and survives --resume."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from helpers import die_at_first_checkpoint
from safetensors.torch import load_file
from test_train import quiet, recipe, records, world  # noqa: F401  (world is a fixture)

import mergekit_lite.train.loop as loop
import mergekit_lite.train.model as train_model
import mergekit_lite.train.run as train_run
from mergekit_lite.errors import MoemergeError
from mergekit_lite.train.moe import RouterTap

# every source of randomness on, gradient accumulation, gradient checkpointing, the selection bias, and a
# checkpoint (step 5) that falls between two log lines (4, 8; the last line at 10 covers 2 steps)
HARD = dict(max_steps=10, checkpoint_every=5, log_every=4, micro_batch_size=4, gradient_accumulation_steps=2,
            gradient_checkpointing=True, moe={"jitter": 0.5, "bias_update_rate": 0.01})
MODES = {"all": {}, "lora": dict(trainable="lora", lora={"r": 4, "alpha": 8, "dropout": 0.2})}


class TrainingTap(RouterTap):
    """Fails the run if a training forward pass (the only caller of `losses`) sees a router in eval mode."""

    def losses(self):
        assert all(r.training for r in self.routers), "training step in eval mode"
        return super().losses()


def crash_then_resume(world, out: Path, monkeypatch, **kw) -> list[str]:
    """Run until the first checkpoint, die there, then `--resume` to the end; returns what the resume said."""
    die_at_first_checkpoint(monkeypatch, lambda: loop.train(recipe(world, out, **kw), echo=quiet))
    with pytest.raises(MoemergeError, match="--resume"):  # a started run is never silently restarted
        loop.train(recipe(world, out, **kw), echo=quiet)
    said: list[str] = []
    loop.train(recipe(world, out, **kw), resume=True, echo=said.append)
    return said


def bias_at(out: Path, step: int) -> torch.Tensor:
    return torch.load(out / "checkpoints" / f"step-{step:07d}" / "extra.pt", weights_only=True)["tap"]["bias"]


@pytest.mark.parametrize("mode", MODES)
def test_resume_reproduces_losses_weights_and_bias_bit_for_bit(world, tmp_path, monkeypatch, mode):
    monkeypatch.setattr(train_model, "RouterTap", TrainingTap)
    kw = {**HARD, **MODES[mode]}
    full, cut = tmp_path / "full", tmp_path / "cut"
    loop.train(recipe(world, full, **kw), echo=quiet)
    crash_then_resume(world, cut, monkeypatch, **kw)
    state = json.loads((cut / "checkpoints" / "step-0000005" / "trainer_state.json").read_text())
    assert state["log_micro_batches"] == 2 and len(state["log_sums"]) == 3  # step 5 = 2 micro-steps after the step-4 line

    def rows(out, kind):
        return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in records(out, kind)]

    assert [r["step"] for r in rows(cut, "train")] == [4, 8, 10]
    for kind in ("train", "router", "val"):  # losses, lr, grad norm, expert load: bit for bit, no duplicates
        assert rows(full, kind) == rows(cut, kind), kind
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(cut / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(str(world["moe"] / "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in a if ".self_attn." in k)  # LoRA did train, through checkpointing
    assert torch.equal(bias_at(full, 10), bias_at(cut, 10)) and bias_at(cut, 10).abs().sum() > 0


def test_tokens_per_s_counts_the_steps_since_the_last_line(world, tmp_path, monkeypatch):
    clock = [0.0]

    class OneSecondPerStep(RouterTap):
        def update_bias(self, reduce=lambda t: t):  # called once per optimizer step
            clock[0] += 1.0
            super().update_bias(reduce)

    monkeypatch.setattr(train_model, "RouterTap", OneSecondPerStep)
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    kw = dict(max_steps=10, checkpoint_every=5, log_every=4, micro_batch_size=4, gradient_accumulation_steps=2)
    crash_then_resume(world, tmp_path / "run", monkeypatch, **kw)
    per_step = 32 * 4 * 2  # seq_len * micro_batch_size * gradient_accumulation_steps
    rows = records(tmp_path / "run", "train")
    assert [(r["step"], r["tokens_per_s"]) for r in rows] == [(4, per_step), (8, per_step), (10, per_step)]


def test_aux_free_bias_lowers_expert_load(world, tmp_path):
    def imbalance(rate: float) -> float:
        """max/mean expert load over the last 10 steps and both layers (1 = even, 2 = all on two experts)."""
        out = tmp_path / f"rate{rate}"
        loop.train(recipe(world, out, max_steps=40, learning_rate=1e-3,
                          moe={"balance_coef": 0.0, "z_coef": 0.0, "bias_update_rate": rate}), echo=quiet)
        return sum(sum(r["max_over_mean"]) for r in records(out, "router")[-10:]) / 20

    off, on = imbalance(0.0), imbalance(0.01)
    assert on < 0.9 * off, (on, off)  # measured 1.35 vs 1.64; with the update's sign flipped, 2.0


def _val_loss_of(folder: Path, world, out: Path) -> float:
    """Validation loss of a saved folder reloaded with transformers, on the batches the run evaluated."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_lite.train.loaders import build_loaders

    class One:  # the loader helper only needs these from an Accelerator
        num_processes, is_main_process = 1, True

        @staticmethod
        def wait_for_everyone():
            pass

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    _, val_dl = build_loaders(recipe(world, out), AutoTokenizer.from_pretrained(str(folder)), world["moe"], One, 1)
    with torch.no_grad():
        losses = [loop.causal_lm_loss(model(input_ids=b["input_ids"]).logits, b["input_ids"])
                  for _, b in zip(range(4), val_dl)]
    return torch.stack(losses).mean().item()


def test_reported_val_loss_is_the_saved_models_under_selection_bias(world, tmp_path):
    out = tmp_path / "biased"
    summary = loop.train(recipe(world, out, max_steps=10, learning_rate=1e-2,
                                moe={"balance_coef": 0.0, "bias_update_rate": 0.05}), echo=quiet)
    saved = _val_loss_of(out / "final", world, out)
    last = records(out, "val")[-1]
    saved_loss = summary["final_val_loss"]
    assert abs(saved_loss - saved) < 1e-5 and last["val_loss"] == saved_loss
    assert json.loads((out / "final" / "moemerge.json").read_text())["training"]["final_val_loss"] == saved_loss
    assert f"| final_val_loss | {saved_loss:.4g} |" in (out / "final" / "README.md").read_text()  # the card
    # the routing used in training, logged beside it under its own name, is another model's loss
    biased = last["val_loss_with_selection_bias"]
    assert biased == summary["final_val_loss_with_selection_bias"] and abs(biased - saved) > 1e-4


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("bias", [False, True])
def test_tapped_router_routes_as_transformers_under_bf16_autocast(family, bias):
    import copy

    from transformers import MixtralConfig, Qwen2MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    torch.manual_seed(0)
    if family == "mixtral":
        router = MixtralTopKRouter(MixtralConfig(hidden_size=64, num_local_experts=8, num_experts_per_tok=2))
    else:
        router = Qwen2MoeTopKRouter(Qwen2MoeConfig(hidden_size=64, num_experts=8, num_experts_per_tok=2,
                                                   norm_topk_prob=True))
    with torch.no_grad():
        router.weight.normal_()
    original = copy.deepcopy(router)
    tap = RouterTap(torch.nn.ModuleList([router]), bias_update_rate=0.1 if bias else 0.0,
                    config={"model_type": "mixtral" if family == "mixtral" else "qwen2_moe", "norm_topk_prob": True})  # a zero bias when on
    h = torch.randn(4, 16, 64).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, w_hf, i_hf = original(h)
        _, w_tap, i_tap = router(h)
    assert w_tap.dtype == w_hf.dtype and torch.equal(i_tap, i_hf) and torch.equal(w_tap, w_hf)
    assert tap.load_sum.sum() == 4 * 16 * 2  # and the tap saw every choice


def test_qwen2_moe_with_size0_shared_expert_resumes_exactly(world, tmp_path, monkeypatch):
    """Upcycled Qwen2-MoE holds size-0 shared-expert tensors that share one storage; checkpoints must keep them."""
    import yaml
    from test_train import SMALL

    from mergekit_lite.ops.upcycle import run_upcycle
    from mergekit_lite.pico import build_pico_model
    from mergekit_lite.train.corpus import stdlib_docstrings

    dense = build_pico_model("qwen2", tmp_path / "dense", texts=stdlib_docstrings(), **SMALL)
    (tmp_path / "up.yaml").write_text(yaml.safe_dump({"source": str(dense), "num_experts": 4, "experts_per_token": 2,
                                                      "dtype": "float32"}))
    run_upcycle(tmp_path / "up.yaml", tmp_path / "moe", echo=quiet)
    kw = dict(model=tmp_path / "moe", max_steps=4, checkpoint_every=2, moe={"jitter": 0.5})
    full, cut = tmp_path / "full", tmp_path / "cut"
    loop.train(recipe(world, full, **kw), echo=quiet)
    crash_then_resume(world, cut, monkeypatch, **kw)  # failed in load_state: "Missing key(s) ... shared_expert"
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(cut / "checkpoints" / "step-0000002" / "state")).read_metadata().state_dict_metadata
    empty = [k for k, m in meta.items() if k.startswith("model.") and ".shared_expert." in k
             and 0 in getattr(m, "size", (1,))]
    assert len(empty) == 3 * SMALL["num_hidden_layers"], sorted(meta)
    assert records(full, "train") and [r["loss"] for r in records(full, "train")] == \
        [r["loss"] for r in records(cut, "train")]


def test_a_shuffled_stream_resumes_to_the_same_run(world, tmp_path, monkeypatch):
    """Streaming with the seeded shuffle buffer (on by default): a run killed at its checkpoint and resumed starts
    the stream where the checkpoint says it stood (not re-reading it) and ends bit-identical to the uninterrupted
    run; a checkpoint without that position (an older one) re-reads the stream and skips, also exactly."""
    kw = dict(max_steps=6, checkpoint_every=3, micro_batch_size=4, moe={"jitter": 0.5},
              data={"train": [world["train"]], "validation": [world["val"]], "streaming": True, "shuffle_buffer": 64})
    full, cut = tmp_path / "full", tmp_path / "cut"
    loop.train(recipe(world, full, **kw), echo=quiet)
    said = crash_then_resume(world, cut, monkeypatch, **kw)
    assert any("(the stream continues after block 12)" in line for line in said), said  # 3 steps x 4 sequences
    assert [r["loss"] for r in records(full, "train")] == [r["loss"] for r in records(cut, "train")]

    import mergekit_lite.train.checkpoint as checkpoint

    older = tmp_path / "older"
    monkeypatch.setattr(checkpoint, "data_state", lambda ckpt: None)
    monkeypatch.setattr(train_run, "data_state", lambda ckpt: None)
    said = crash_then_resume(world, older, monkeypatch, **kw)
    assert not any("stream continues" in line for line in said)
    assert [r["loss"] for r in records(full, "train")] == [r["loss"] for r in records(older, "train")]


def test_the_shuffle_buffer_is_seeded_and_loses_nothing():
    from mergekit_lite.train.stream import shuffled

    items = list(range(1000))
    a, b, c = (list(shuffled(iter(items), 64, seed)) for seed in (1, 1, 2))
    assert a == b != c and sorted(a) == items and a != items
    assert max(abs(i - pos) for pos, i in enumerate(a)) > 64  # items travel beyond one buffer's width
    assert list(shuffled(iter(items[:10]), 64, 1)) != items[:10] and sorted(shuffled(iter(items[:10]), 64, 1)) == \
        items[:10]  # a stream shorter than the buffer is shuffled whole
