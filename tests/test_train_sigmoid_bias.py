"""Training DeepSeek-V3-style routers (issue 13): the tap finds them, their balance loss is defined on
normalised sigmoid scores, and aux-loss-free balancing moves the model's own `e_score_correction_bias`, which
final/ saves: the saved model routes as trained, so train's reported val_loss is the reloaded model's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import quiet, recipe, records, world  # noqa: F401  (world is a fixture)

import mergekit_lite.train.loop as loop
from mergekit_lite.train.moe import RouterTap, find_routers

E, K = 4, 2
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=64, moe_intermediate_size=32, max_position_embeddings=128,
            initializer_range=0.2)  # experts that differ, so routing shows in the loss


def tiny_config(family: str, vocab: int):
    from transformers import Dots1Config, Ernie4_5_MoeConfig, Glm4MoeConfig

    if family == "glm4_moe":
        return Glm4MoeConfig(vocab_size=vocab, n_routed_experts=E, num_experts_per_tok=K, n_shared_experts=1,
                             first_k_dense_replace=0, n_group=1, topk_group=1, norm_topk_prob=True,
                             partial_rotary_factor=1.0, num_nextn_predict_layers=0, **TINY)
    if family == "dots1":
        return Dots1Config(vocab_size=vocab, n_routed_experts=E, num_experts_per_tok=K, n_shared_experts=1,
                           first_k_dense_replace=0, n_group=1, topk_group=1, norm_topk_prob=True, **TINY)
    return Ernie4_5_MoeConfig(vocab_size=vocab, moe_num_experts=E, moe_k=K, moe_num_shared_experts=0,
                              moe_layer_start_index=0, moe_layer_interval=1, tie_word_embeddings=False, **TINY)


def build(family: str, world, folder: Path) -> Path:
    """A random-init model of `family`, saved with transformers, with the pico Llama's tokenizer beside it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world["dense"]))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok))).float()
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def val_loss_of(folder: Path, world, out: Path) -> float:
    """The saved folder's validation loss, reloaded with plain transformers, on the batches train evaluates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_lite.train.loaders import build_loaders

    class One:  # what build_loaders needs from an Accelerator
        num_processes, is_main_process = 1, True

        @staticmethod
        def wait_for_everyone():
            pass

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    _, val_dl = build_loaders(recipe(world, out, model=folder), AutoTokenizer.from_pretrained(str(folder)), folder,
                              One, 1)
    with torch.no_grad():
        losses = [loop.causal_lm_loss(model(input_ids=b["input_ids"]).logits, b["input_ids"])
                  for _, b in zip(range(4), val_dl)]
    return torch.stack(losses).mean().item()


def saved_biases(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for shard in folder.glob("*.safetensors"):
        state |= {k: v for k, v in load_file(shard).items() if k.endswith("e_score_correction_bias")}
    return state


@pytest.mark.parametrize("family", ["glm4_moe", "dots1", "ernie4_5_moe"])
def test_trained_selection_bias_is_saved_and_val_loss_is_the_saved_models(world, tmp_path, family):
    model = build(family, world, tmp_path / family)
    out = tmp_path / "run"
    summary = loop.train(recipe(world, out, model=model, max_steps=8, learning_rate=1e-2,
                                moe={"balance_coef": 0.0, "bias_update_rate": 0.05}), echo=quiet)
    biases = saved_biases(out / "final")
    assert len(biases) == 2 and all(b.abs().sum() > 0 for b in biases.values()), biases  # one per MoE layer
    # the bias moved is the model's: nothing separate is reported, and the reloaded model gives val_loss
    assert "final_val_loss_with_selection_bias" not in summary
    assert abs(val_loss_of(out / "final", world, out) - summary["final_val_loss"]) < 1e-4
    assert records(out, "val")[-1]["val_loss"] == summary["final_val_loss"]
    # and it matters: the same weights with the bias zeroed route otherwise
    shard = next((out / "final").glob("*.safetensors"))
    from safetensors.torch import save_file

    state = load_file(shard)
    unbiased = tmp_path / "unbiased"
    shutil.copytree(out / "final", unbiased)
    save_file({k: (torch.zeros_like(v) if k.endswith("e_score_correction_bias") else v) for k, v in state.items()},
              unbiased / shard.name, metadata={"format": "pt"})
    assert abs(val_loss_of(unbiased, world, out) - summary["final_val_loss"]) > 1e-3  # measured 4e-3, 6e-3


def test_sigmoid_router_found_balance_loss_on_normalised_scores(world, tmp_path):
    """glm4_moe's router is found; its balance loss uses sigmoid scores divided by their sum (DeepSeek-V3)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(build("glm4_moe", world, tmp_path / "g")), dtype=torch.float32)
    names = [n for n, _ in find_routers(model)]
    assert names == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    tap = RouterTap(model)
    seen = {}
    for name, r in find_routers(model):
        r.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, o))
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
    balance, z = tap.losses()
    expect_bal, expect_z = [], []
    for logits, _, idx in seen.values():
        s = logits.sigmoid()
        p = s / s.sum(-1, keepdim=True)
        f = torch.bincount(idx.reshape(-1), minlength=E).float() / idx.numel()
        expect_bal.append(E * (f * p.mean(0)).sum())
        expect_z.append(torch.logsumexp(logits, -1).pow(2).mean())
    assert balance.item() == pytest.approx(torch.stack(expect_bal).mean().item(), rel=1e-6)
    assert z.item() == pytest.approx(torch.stack(expect_z).mean().item(), rel=1e-6)
    # with softmax probabilities instead (the old tap's rule) the figure is another one
    soft = [E * (torch.bincount(i.reshape(-1), minlength=E).float() / i.numel() * lg.softmax(-1).mean(0)).sum()
            for lg, _, i in seen.values()]
    assert abs(balance.item() - torch.stack(soft).mean().item()) > 1e-4
    stats = tap.read_stats()
    assert all(abs(sum(row) - 1) < 1e-6 for row in stats["load"]) and tap.tokens == 0
