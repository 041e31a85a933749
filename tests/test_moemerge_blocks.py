"""PEER and Multi-Head MoE blocks grown from a dense model (issue 27), `block:` under `architecture: moemerge`.

Add mode keeps step-0 parity for every family (dense FFN kept, output projection zero); product-key retrieval equals
a brute-force top-k over all N scores; MH-MoE with one head, identity projections and copied experts is the top-k
block; gradients reach only the retrieved experts; replace mode says in --dry-run how it starts; bad inputs give one
line and write nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_moemerge_target import DIMS, max_delta, quiet, upcycle

from mergekit_lite.errors import MoemergeError
from mergekit_lite.io.sidefiles import read_sidecar
from mergekit_lite.models import code_status, load_causal_lm
from mergekit_lite.models.moemerge.configuration_moemerge import MoemergeConfig
from mergekit_lite.models.moemerge.modeling_moemerge import (
    MoemergeMultiHeadBlock,
    MoemergePeerBlock,
    MoemergePeerRetrieval,
    MoemergeSparseBlock,
)
from mergekit_lite.ops.upcycle import run_upcycle

PEER = {"num_experts": 256, "experts_per_token": 4, "block": {"kind": "peer", "heads": 2, "key_dim": 8}}
MH_MOE = {"num_experts": 4, "experts_per_token": 2, "block": {"kind": "mh_moe", "heads": 4}}
FAMILIES = ["llama", "qwen3", "gemma3_text"]


def text_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, **kw).to_dict()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("block", [PEER, MH_MOE], ids=["peer", "mh_moe"])
def test_add_mode_keeps_step0_parity(tmp_path, pico_factory, family, block):
    """The block is really there and computes something (its projection is zero, not the block absent)."""
    dense = pico_factory(family, **DIMS)
    out = upcycle(tmp_path, source=dense, dense_layers=1, **block)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["block_kind"] == block["block"]["kind"] and cfg["block_mode"] == "add" and cfg["mlp_only_layers"] == [0]
    assert code_status(out) == "own"
    assert max_delta(out, dense) <= 1e-4
    model = load_causal_lm(out, dtype=torch.float32)
    added = model.model.layers[1].mlp.added
    x = torch.randn(5, DIMS["hidden_size"], generator=torch.Generator().manual_seed(0))
    out_proj = added.expert_down if block is PEER else added.merge_proj.weight
    with torch.no_grad():
        assert added(x).abs().max() == 0
        out_proj.normal_()
        assert added(x).abs().max() > 1e-3
    # what `trainable: added` will train: the block's tensors (and routers), none of the dense model's
    keys = read_sidecar(out)["added"]
    assert keys and all(".mlp.added." in k for k in keys)
    assert all(k in load_file(out / "model.safetensors") for k in keys)
    # active parameters per token (heads x k experts) agree: the plan's record, `moemerge inspect`, the trainer's
    from mergekit_lite.inspect_model import describe
    from mergekit_lite.train.model import active_params

    side = read_sidecar(out)
    assert describe(out)["active_params"] == side["active_params"] == active_params(model)  # buffers saved count
    assert side["active_params"] < side["total_params"] or block is MH_MOE  # h x k = 8 of 4 experts: all run


def test_retrieval_equals_brute_force_top_k():
    """Product keys (top-k per half, k*k candidates, top-k) = the top-k of all N = n*n full scores (no ties)."""
    cfg = MoemergeConfig(text_config=text_config(), num_experts=400, num_experts_per_tok=6, block_kind="peer",
                         block_heads=3, peer_key_dim=10)
    torch.manual_seed(0)
    ret = MoemergePeerRetrieval(cfg).eval()
    with torch.no_grad():
        ret.sub_keys.normal_()
        ret.query_norm.running_mean.normal_()  # eval-mode BatchNorm with non-trivial statistics
        ret.query_norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(37, 32)
    with torch.no_grad():
        scores, idx = ret(x)
        q = ret.query_norm(ret.query(x)).view(37, 3, 2, 5)
        full = (torch.einsum("thd,hnd->thn", q[:, :, 0], ret.sub_keys[:, 0])[..., :, None]
                + torch.einsum("thd,hnd->thn", q[:, :, 1], ret.sub_keys[:, 1])[..., None, :]).flatten(2)  # (T, h, N)
    best = full.topk(6, dim=-1)
    assert idx.shape == (37, 3, 6)
    assert torch.equal(idx, best.indices)
    torch.testing.assert_close(scores, best.values, rtol=1e-5, atol=1e-5)


def test_peer_gradients_reach_only_retrieved_experts():
    cfg = MoemergeConfig(text_config=text_config(), num_experts=1024, num_experts_per_tok=3, block_kind="peer",
                         block_heads=2, peer_key_dim=8)
    torch.manual_seed(0)
    block = MoemergePeerBlock(cfg).train()
    with torch.no_grad():
        for p in (block.retrieval.sub_keys, block.expert_up, block.expert_down):
            p.normal_()
    x = torch.randn(2, 5, 32)
    block(x).pow(2).sum().backward()
    with torch.no_grad():  # train-mode BatchNorm on the same batch: the same choice again
        _, idx = block.retrieval(x.reshape(-1, 32))
    chosen = torch.zeros(1024, dtype=torch.bool)
    chosen[idx.flatten()] = True
    for table in (block.expert_up, block.expert_down):
        touched = table.grad.abs().sum(-1) > 0
        assert touched.any() and not touched[~chosen].any()
        assert touched[chosen].float().mean() > 0.5  # (GELU far below 0 gives a row an exactly-zero gradient)


def test_mh_moe_with_one_head_is_the_topk_block():
    """h = 1, identity head/merge projections, the same router and experts: the top-k block's output."""
    cfg = MoemergeConfig(text_config=text_config(), num_experts=4, num_experts_per_tok=2, block_kind="mh_moe",
                         block_heads=1, moe_intermediate_size=16)
    torch.manual_seed(0)
    topk = MoemergeSparseBlock(cfg)
    mh = MoemergeMultiHeadBlock(cfg)
    for m in (topk, mh):
        for p in m.parameters():
            torch.nn.init.normal_(p)
    mh.gate.load_state_dict(topk.gate.state_dict())
    mh.experts.load_state_dict(topk.experts.state_dict())
    with torch.no_grad():
        mh.head_proj.weight.copy_(torch.eye(32))
        mh.merge_proj.weight.copy_(torch.eye(32))
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(mh(x), topk(x), rtol=1e-5, atol=1e-5)


def test_mh_moe_routes_sub_tokens():
    """With h heads the router sees h sub-tokens per token, of width hidden / h."""
    cfg = MoemergeConfig(text_config=text_config(), num_experts=4, num_experts_per_tok=2, block_kind="mh_moe",
                         block_heads=4, moe_intermediate_size=8)
    block = MoemergeMultiHeadBlock(cfg)
    seen = []
    block.gate.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    block(torch.randn(2, 3, 32))
    assert seen == [torch.Size([24, 8])] and block.gate.weight.shape == (4, 8)


@pytest.mark.parametrize("block", [PEER, MH_MOE], ids=["peer", "mh_moe"])
def test_replace_mode_dry_run_says_how_it_starts(tmp_path, pico_factory, block):
    dense = pico_factory("llama", **DIMS)
    lines: list[str] = []
    path = tmp_path / "r.yaml"
    body = {"source": str(dense), "architecture": "moemerge", "dtype": "float32", **block}
    body["block"] = {**block["block"], "mode": "replace"}
    path.write_text(yaml.safe_dump(body))
    run_upcycle(path, tmp_path / "out", dry_run=True, echo=lines.append, progress=False)
    text = "\n".join(lines)
    assert "mode replace" in text and "no step-0 parity" in text and not (tmp_path / "out").exists()
    out = upcycle(tmp_path, source=dense, **{**block, "block": body["block"]})
    state = load_file(out / "model.safetensors")
    assert "model.layers.1.mlp.gate_proj.weight" not in state  # the dense FFN is gone
    assert max_delta(out, dense) > 1e-3


def test_peer_with_a_million_experts_plans_and_runs_in_table_memory(tmp_path, pico_factory):
    """N = 1024^2: the dry-run plan is made of a few ops per layer; one PEER layer runs forward and backward."""
    dense = pico_factory("llama", **DIMS)
    lines: list[str] = []
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"source": str(dense), "architecture": "moemerge", "num_experts": 1024 ** 2,
                                    "experts_per_token": 16, "block": {"kind": "peer"}}))
    plan = run_upcycle(path, None, dry_run=True, echo=lines.append, progress=False)
    assert len(plan.ops) < 100
    cfg = MoemergeConfig(text_config=text_config(), num_experts=1024 ** 2, num_experts_per_tok=16,
                         block_kind="peer", block_heads=8, peer_key_dim=128)
    block = MoemergePeerBlock(cfg)
    with torch.no_grad():
        for p in (block.retrieval.sub_keys, block.expert_up, block.expert_down):
            p.normal_(0, 0.02)
    block(torch.randn(4, 16, 32)).square().mean().backward()
    assert block.expert_up.grad.shape == (1024 ** 2, 32)


BAD = [
    ({**PEER, "num_experts": 250}, "not a perfect square"),
    ({**PEER, "experts_per_token": 17}, "above n = sqrt(num_experts) = 16"),
    ({**MH_MOE, "block": {"kind": "mh_moe", "heads": 5}}, "block.heads=5 does not divide the source's hidden_size"),
    ({**PEER, "architecture": "mixtral"}, "`block` needs architecture: moemerge"),
    ({**PEER, "block": {"kind": "peer", "expert_size": 8}}, "block.expert_size does not apply to block.kind: peer"),
    ({**MH_MOE, "block": {"kind": "topk", "mode": "add"}}, "block.mode: add needs kind peer or mh_moe"),
    ({**PEER, "noise": 0.1}, "noise does not apply to block.kind: peer"),
    ({**PEER, "block": {"kind": "peer", "key_dim": 7}}, "must be even"),
    ({"num_experts": 5000, "experts_per_token": 2}, "only block.kind: peer takes more"),
]


@pytest.mark.parametrize("fields,message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_inputs_refused_nothing_written(tmp_path, pico_factory, fields, message):
    """The project's error (exit 2 at the CLI, the house format for recipe errors) naming the field and the fix."""
    dense = pico_factory("llama", **DIMS)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"source": str(dense), "architecture": "moemerge", "dtype": "float32", **fields}))
    with pytest.raises(MoemergeError) as err:
        run_upcycle(path, tmp_path / "out", echo=quiet, progress=False)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_perfect_square_check_matches_config():
    with pytest.raises(ValueError, match="perfect square"):
        MoemergeConfig(text_config=text_config(), num_experts=50, num_experts_per_tok=2, block_kind="peer")
    assert math.isqrt(MoemergeConfig(text_config=text_config(), num_experts=49, num_experts_per_tok=2,
                                     block_kind="peer").num_experts) == 7


def test_error_type_is_the_projects(tmp_path, pico_factory):
    dense = pico_factory("llama", **DIMS)
    with pytest.raises(MoemergeError, match="does not divide"):
        upcycle(tmp_path, source=dense, num_experts=4, experts_per_token=2, block={"kind": "mh_moe", "heads": 3})


def test_upcycled_peer_folder_loads_without_missing_keys(tmp_path, pico_factory):
    dense = pico_factory("gemma3_text", **DIMS)
    out = upcycle(tmp_path, source=dense, **{**PEER, "block": {**PEER["block"], "mode": "replace"}})
    model, info = load_causal_lm(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert isinstance(model.model.layers[0].mlp, MoemergePeerBlock)
    assert Path(out / "modeling_moemerge.py").is_file()


def test_topk_active_params_count_k_of_e_experts(tmp_path, pico_factory):
    """The trainer's active parameters of a moemerge top-k model (its MoE fields sit beside text_config) are
    `moemerge inspect`'s: k of E experts, not every parameter."""
    from mergekit_lite.inspect_model import describe
    from mergekit_lite.train.model import active_params

    out = upcycle(tmp_path, source=pico_factory("llama", **DIMS))
    model = load_causal_lm(out, dtype=torch.float32)
    side = read_sidecar(out)
    assert active_params(model) == describe(out)["active_params"] < side["total_params"]
