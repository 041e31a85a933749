"""Training-time routing policies (issue 15) on hand-made router inputs whose selection is known, through
`train/routing.py`'s pure functions and through the one router tap on transformers' own MoE block."""

from __future__ import annotations

import math

import pytest
import torch
from test_train import quiet, recipe, world  # noqa: F401  (world is a fixture)

import mergekit_lite.train.loop as loop
from mergekit_lite.errors import MoemergeError
from mergekit_lite.train import routing
from mergekit_lite.train.checkpoint import model_tensors
from mergekit_lite.train.moe import NOISE_PARAM, RouterTap

SOFTMAX = routing.Scoring()


MIXTRAL = {"model_type": "mixtral"}  # what a bare block's tap reads its router family from

def moe_cfg(**kw):
    from pydantic import BaseModel

    class Moe(BaseModel):  # the recipe's moe section, only the fields the tap reads
        routing: str = "topk"
        train_top_k: int | None = None
        capacity_factor: float | None = None
        drop_policy: str = "position"

    return Moe(**kw)


def block(impl: str = "grouped_mm", E: int = 4, k: int = 2, H: int = 8):
    """transformers' Mixtral MoE block with its router steered by the input: router row e reads channel e."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=H, intermediate_size=16, num_local_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    torch.manual_seed(0)
    b = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        b.gate.weight.zero_()
        b.gate.weight[:, :E] = torch.eye(E)
        b.experts.gate_up_proj.normal_()
        b.experts.down_proj.normal_()
    return b


def test_noise_term_and_zero_noise_equals_plain_topk():
    torch.manual_seed(0)
    logits, x = torch.randn(6, 4), torch.randn(6, 8)
    eps = torch.randn(6, 4)
    # Shazeer's zero-initialised W_noise is not noise-free: softplus(0) = ln 2 is the noise scale
    assert torch.allclose(routing.noisy_logits(logits, x, torch.zeros(4, 8), eps), logits + math.log(2) * eps)
    # a zero draw (or a noise scale driven to 0) leaves exactly plain top-k: same experts, same weights
    noisy = routing.noisy_logits(logits, x, torch.randn(4, 8), torch.zeros(6, 4))
    s = SOFTMAX.scores(noisy)
    w, idx = routing.topk(s, s, 2, SOFTMAX)
    top = torch.softmax(logits, -1).topk(2)
    assert torch.equal(idx, top.indices) and torch.allclose(w, top.values / top.values.sum(-1, keepdim=True))


def test_noisy_topk_through_the_tap_uses_its_noise_weights_and_only_in_training():
    b = block()
    tap = RouterTap(b, config=MIXTRAL, moe=moe_cfg(routing="noisy_topk"))
    w_noise = getattr(b.gate, NOISE_PARAM)
    assert w_noise.shape == b.gate.weight.shape and not w_noise.abs().sum()  # zero-initialised, a parameter
    x = torch.randn(32, 8)
    with torch.no_grad():
        w_noise.normal_()
        b.eval()
        _, w_eval, i_eval = b.gate(x)  # validation: the saved router, no noise
        logits = torch.nn.functional.linear(x, b.gate.weight)
        assert torch.equal(i_eval, torch.softmax(logits, -1).topk(2).indices)
        b.train()
        torch.manual_seed(5)
        _, w, idx = b.gate(x)
        torch.manual_seed(5)
        s = SOFTMAX.scores(routing.noisy_logits(logits, x, w_noise, torch.randn(32, 4)))
        w_ref, i_ref = routing.topk(s, s, 2, SOFTMAX)  # softmax over the kept noisy logits
    assert torch.equal(idx, i_ref) and torch.allclose(w, w_ref) and not torch.equal(idx, i_eval)
    assert tap.is_moe


def test_switch_picks_the_argmax_with_its_raw_probability():
    b = block()
    RouterTap(b, config=MIXTRAL, moe=moe_cfg(routing="switch", train_top_k=1))
    x = torch.zeros(3, 8)
    x[0, 2], x[1, 0], x[2, 3] = 3.0, 1.0, 0.5  # token t prefers expert (2, 0, 3)
    b.train()
    with torch.no_grad():
        logits, w, idx = b.gate(x)
    assert idx.tolist() == [[2], [0], [3]]
    p = torch.softmax(logits, -1)
    assert torch.allclose(w[:, 0], p.max(-1).values) and (w < 0.9).all()  # not renormalised to 1


def test_train_top_k_changes_k_while_training_only():
    b = block()
    RouterTap(b, config=MIXTRAL, moe=moe_cfg(train_top_k=3))
    x = torch.randn(5, 8)
    with torch.no_grad():
        b.train()
        logits, w, idx = b.gate(x)
        b.eval()
        _, _, i_eval = b.gate(x)
    top = torch.softmax(logits, -1).topk(3)
    assert torch.equal(idx, top.indices) and torch.allclose(w, top.values / top.values.sum(-1, keepdim=True))
    assert i_eval.shape == (5, 2)  # the saved model's k


def test_gshard_second_expert_frequency_is_twice_its_weight():
    # two tokens: normalised top-2 weights (0.7, 0.3) and (0.55, 0.45): second sent with p = 0.6 and 0.9
    scores = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.45, 0.55, 0.0]])
    n = 20000
    gen = torch.Generator().manual_seed(0)
    sent = torch.zeros(2)
    for _ in range(n // 1000):
        u = torch.rand(1000, 2, generator=gen)
        for t in range(2):
            w, idx = routing.gshard(scores[t:t + 1].expand(1000, -1), scores[t:t + 1].expand(1000, -1), u[:, t],
                                    SOFTMAX)
            assert (idx[:, 0] == (0 if t == 0 else 2)).all()  # the first expert always
            assert torch.allclose(w[:, 0], scores[t].max().expand(1000))  # g1 as normalised over the top 2
            sent[t] += (idx[:, 1] < 4).sum()
            assert ((idx[:, 1] == 4) == (w[:, 1] == 0)).all()  # unsent: index E, weight 0
    for t, p in enumerate((0.6, 0.9)):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(sent[t] - n * p) < 5 * sigma, (t, sent[t].item(), n * p)  # binomial bound


def test_capacity_drops_beyond_the_bound_in_the_stated_order():
    idx = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 3], [3, 0]])
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [0.3, 0.7]])
    cap = routing.capacity(5, 2, 4, 0.8)
    assert cap == 2  # ceil(0.8 * 5 * 2 / 4)
    i_pos, w_pos, d_pos = routing.drop_over_capacity(idx, w, 4, cap, "position")
    # expert 0 is chosen by tokens 0, 1, 2, 3, 4: token order keeps 0 and 1
    assert d_pos.tolist() == [[False, False], [False, False], [False, True], [True, False], [False, True]]
    assert i_pos[2, 1] == 4 and w_pos[2, 1] == 0 and i_pos[0].tolist() == [0, 1]
    _, _, d_prob = routing.drop_over_capacity(idx, w, 4, cap, "probs")
    # by weight expert 0 keeps 0.9 (token 3) and 0.8 (token 2); drops 0.6, 0.5, 0.7
    assert d_prob.tolist() == [[True, False], [True, False], [False, False], [False, False], [False, True]]
    unsent = idx.clone()
    unsent[:, 1] = 4  # index E takes no room
    assert not routing.drop_over_capacity(unsent, w, 4, cap, "position")[2][:, 1].any()


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("policy", ["position", "probs"])
def test_dropped_tokens_pass_through_the_residual(impl, policy):
    """A token whose every assignment is dropped gets exactly 0 from the block (the residual carries it)."""
    b = block(impl)
    tap = RouterTap(b, config=MIXTRAL, moe=moe_cfg(capacity_factor=0.5, drop_policy=policy))
    a = torch.tensor([3.0, 3.5, 2.5, 4.0, 2.2, 3.2, 2.8, 3.9])  # every token: expert 0 first, then expert 1
    x = torch.zeros(1, 8, 8)
    x[0, :, 0], x[0, :, 1] = a, 2.0
    with torch.no_grad():
        b.eval()
        tap.active = False  # as train's evaluate(): not counted
        full = b(x)[0]
        b.train()
        tap.active = True
        capped = b(x)[0]
    cap = routing.capacity(8, 2, 4, 0.5)
    assert cap == 2
    if policy == "position":
        kept = {0: [0, 1], 1: [0, 1]}
    else:  # expert 0's weight grows with a, expert 1's falls
        order = a.argsort().tolist()
        kept = {0: order[-2:], 1: order[:2]}
    both = set(kept[0]) & set(kept[1])
    none = set(range(8)) - set(kept[0]) - set(kept[1])
    assert none and torch.equal(capped[sorted(none)], torch.zeros(len(none), 8))
    for t in both:
        assert torch.allclose(capped[t], full[t], atol=1e-6)
    for t in set(range(8)) - none - both:  # one assignment kept, with its own (not renormalised) weight
        assert 0 < (capped[t] - full[t]).abs().max() and capped[t].abs().sum() > 0
    stats = tap.read_stats()
    assert stats["dropped"] == [pytest.approx((16 - 4) / 16)] and stats["load"][0][:2] == [0.5, 0.5]


def test_bad_policies_refused():
    from mergekit_lite.errors import MoemergeError
    from mergekit_lite.recipe import MoETraining

    for bad, needle in [({"routing": "expert_choice"}, "routing"), ({"capacity_factor": 0}, "capacity_factor"),
                        ({"capacity_factor": -1.0}, "capacity_factor"),
                        ({"routing": "switch", "train_top_k": 2}, "train_top_k: 1"),
                        ({"routing": "gshard", "train_top_k": 1}, "train_top_k: 2")]:
        with pytest.raises(Exception, match=needle):
            MoETraining(**bad)
    cfg = {"num_local_experts": 4, "num_experts_per_tok": 2}
    with pytest.raises(MoemergeError, match="train_top_k: 1"):
        routing.check_routing(MoETraining(routing="switch"), cfg)
    routing.check_routing(MoETraining(routing="switch", train_top_k=1), cfg)  # the explicit opt-in
    routing.check_routing(MoETraining(routing="gshard"), cfg)
    with pytest.raises(MoemergeError, match="train_top_k: 2"):
        routing.check_routing(MoETraining(routing="gshard"), {**cfg, "num_experts_per_tok": 1})
    with pytest.raises(MoemergeError, match="n_group"):
        routing.check_routing(MoETraining(routing="noisy_topk"), {**cfg, "n_group": 2})
    with pytest.raises(MoemergeError, match="at most 4"):
        routing.check_routing(MoETraining(train_top_k=6), cfg)


# --- whole runs: exact --resume per policy, W_noise checkpointed but not saved, drops logged ----------------
POLICY_RUNS = {
    "noisy_topk": {"routing": "noisy_topk"},
    "switch": {"routing": "switch", "train_top_k": 1},
    "gshard+capacity": {"routing": "gshard", "capacity_factor": 1.0},
    "topk+capacity-probs": {"capacity_factor": 0.75, "drop_policy": "probs"},
}


@pytest.mark.parametrize("policy", POLICY_RUNS)
def test_resume_is_exact_for_every_policy(world, tmp_path, monkeypatch, policy):
    from safetensors.torch import load_file
    from test_train import records
    from test_train_resume import HARD, crash_then_resume

    kw = {**HARD, "moe": {**HARD["moe"], **POLICY_RUNS[policy]}}  # jitter and the selection bias on too
    full, cut = tmp_path / "full", tmp_path / "cut"
    loop.train(recipe(world, full, **kw), echo=quiet)
    crash_then_resume(world, cut, monkeypatch, **kw)

    def rows(out, kind):
        return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in records(out, kind)]

    for kind in ("train", "router", "val"):
        assert rows(full, kind) == rows(cut, kind), kind
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(cut / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(NOISE_PARAM in k for k in a)  # final/ is the plain HF class
    ckpt = model_tensors(cut / "checkpoints" / "step-0000010")
    noise = {k: v for k, v in ckpt.items() if k.endswith(NOISE_PARAM)}
    if policy == "noisy_topk":
        assert len(noise) == 2 and all(v.abs().sum() > 0 for v in noise.values())  # trained from zero
    else:
        assert not noise
    dropped = [d for r in records(cut, "router") for d in r["dropped"]]
    assert (max(dropped) > 0) == ("capacity" in policy), dropped


def test_plot_draws_the_dropped_share_per_layer(tmp_path, monkeypatch):
    import json

    from mergekit_lite.train import plot

    rows = [{"type": "train", "step": s, "tokens": 64 * s, "loss": 5.0, "ce": 5.0, "balance": 1.0, "z": 1.0,
             "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0} for s in (1, 2)]
    rows += [{"type": "router", "step": s, "load": [[0.5, 0.5], [0.9, 0.1]], "max_over_mean": [1.0, 1.8],
              "dead": [0, 0], "entropy": [0.6, 0.3], "dropped": [0.0, d]} for s, d in ((1, 0.25), (2, 0.125))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = {}
    real = plot._save
    monkeypatch.setattr(plot, "_save", lambda fig, path: drawn.setdefault(path.name, fig) and real(fig, path))
    plot.plot_run(tmp_path)
    panel = drawn["expert_load.png"].axes[2]
    assert [list(line.get_ydata()) for line in panel.get_lines()] == [[0.0, 0.0], [0.25, 0.125]]
    assert plot.dropped_series(rows[2:]) == ([1, 2], [[0.0, 0.0], [0.25, 0.125]])
    assert plot.dropped_series([{**r, "dropped": [0.0, 0.0]} for r in rows[2:]]) is None  # no capacity: 2 panels


@pytest.mark.parametrize("moe,extra,needle", [
    ({"routing": "switch"}, {}, "train_top_k: 1"),  # the Mixtral here routes top-2
    ({"routing": "noisy_topk"}, {"trainable": "lora"}, "W_noise"),
    ({"routing": "top1"}, {}, "moe.routing"),
    ({"capacity_factor": 0.0}, {}, "capacity_factor"),
])
def test_bad_routing_refused_before_training(world, tmp_path, moe, extra, needle):
    from mergekit_lite.errors import MoemergeError

    with pytest.raises(MoemergeError, match=needle):
        loop.train(recipe(world, tmp_path / "bad", moe=moe, **extra), echo=quiet)
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_gshard_capacity_places_first_choices_before_second_choices():
    """Token 1's first choice (expert 1) loses its place to token 0's second choice in token order (Megatron);
    GShard (Algorithm 1) places all first choices first, so both tokens keep their first expert."""
    idx = torch.tensor([[0, 1], [1, 0]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    tok_idx, _, tok_drop = routing.drop_over_capacity(idx, w, 2, 1, "position")
    assert tok_drop.tolist() == [[False, False], [True, True]]  # token 1 lost its first choice
    g_idx, g_w, g_drop = routing.drop_over_capacity(idx, w, 2, 1, "position", choices_first=True)
    assert g_drop.tolist() == [[False, True], [False, True]]
    assert g_idx.tolist() == [[0, 2], [1, 2]] and torch.equal(g_w, torch.tensor([[0.6, 0.0], [0.7, 0.0]]))


def test_gshard_balance_loss_counts_first_choices_only():
    from mergekit_lite.recipe import MoETraining

    probs = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]])
    logits = probs.log()
    idx = torch.tensor([[0, 1], [0, 2]])  # first choices: expert 0 twice; second: experts 1 and 2
    losses = {}
    for policy in ("gshard", "topk"):
        tap = RouterTap(torch.nn.Module(), config=MIXTRAL, moe=MoETraining(routing=policy, train_top_k=2 if policy == "gshard" else None))
        tap.routers, tap._seen = [object()], [(logits, probs, idx)]
        losses[policy] = tap.losses()[0].item()
    P = probs.mean(0)
    assert losses["gshard"] == pytest.approx(3 * (1.0 * P[0]).item())  # f = (1, 0, 0): c_e / S
    assert losses["topk"] == pytest.approx(3 * (0.5 * P[0] + 0.25 * P[1] + 0.25 * P[2]).item())


def test_the_tap_hooks_routers_and_leaves_their_class_methods_alone():
    """No forward rebound, no private attribute on transformers' router; the hooks come off again."""
    import copy

    b = block()
    plain = copy.deepcopy(b)
    tap = RouterTap(b, config=MIXTRAL, moe=moe_cfg(routing="switch", train_top_k=1))
    assert "forward" not in vars(b.gate) and not [k for k in vars(b.gate) if k.startswith("_moemerge")]
    x = torch.randn(1, 16, 8)
    b.train()
    plain.train()
    with torch.no_grad():
        assert not torch.equal(b(x)[0], plain(x)[0])  # the switch policy re-routes through the hook
        tap.remove()
        assert torch.equal(b(x)[0], plain(x)[0])  # without the hooks: transformers' own top-2


def test_scoring_and_saved_bias_come_from_the_family_table():
    from mergekit_lite.arch.tables import MOE

    for name, fam in MOE.items():
        scoring = routing.Scoring.of(fam.router_spec, {"model_type": name})
        assert scoring.sigmoid == (fam.router_spec.scoring[0] == "sigmoid"), name
    assert routing.Scoring.of(MOE["moemerge"].router_spec, {"model_type": "moemerge", "scoring": "sigmoid"}).sigmoid
    assert not routing.Scoring.of(MOE["qwen2_moe"].router_spec, {"model_type": "qwen2_moe",
                                                                  "norm_topk_prob": False}).renormalise
    with pytest.raises(MoemergeError, match="'olmoe' is an MoE family moemerge does not describe"):
        RouterTap(block(), config={"model_type": "olmoe"})
    tap = RouterTap(block(), config=MIXTRAL)
    assert not tap.native_bias and tap.tapped[0].saved_bias() is None
