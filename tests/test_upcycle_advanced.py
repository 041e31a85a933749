"""Advanced upcycling: granular experts, Drop-Upcycling, noise, shared experts, experts from several models,
prompt-based routers, partial MoE, and `inspect` showing how an output was built."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from helpers import weights
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergekit_lite.cli import app
from mergekit_lite.errors import MoemergeError
from mergekit_lite.inspect_model import describe, describe_lines
from mergekit_lite.io import CheckpointReader
from mergekit_lite.ops.upcycle import run_upcycle
from mergekit_lite.pico import build_pico_model
from mergekit_lite.verify import compare_logits

DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
H, I = 32, 64
TARGETS = [("llama", "mixtral"), ("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe")]
MIX = "model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
QWEN = "model.layers.{i}.mlp.experts.{e}.{p}_proj.weight"
DENSE = "model.layers.{i}.mlp.{p}_proj.weight"


def quiet(_line: str) -> None:
    pass


def recipe(tmp_path: Path, name: str = "r", **fields) -> Path:
    body = {"num_experts": 4, "experts_per_token": 2, "dtype": "float32", **fields}
    for k in ("source", "base"):
        if k in body:
            body[k] = str(body[k])
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def upcycle(tmp_path: Path, name: str = "out", **fields) -> tuple[Path, object]:
    out = tmp_path / name
    plan = run_upcycle(recipe(tmp_path, name, **fields), out, echo=quiet)
    return out, plan


@pytest.fixture
def no_heavy_io(monkeypatch):
    """Any attempt to read tensor bytes fails: errors must come from headers and configs only."""
    def boom(self, key):
        raise AssertionError(f"tensor bytes of {key} were read before the error")
    monkeypatch.setattr(CheckpointReader, "get", boom)


# --- 1. granular experts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("G", [2, 4])
@pytest.mark.parametrize("family,target", TARGETS, ids=[t for _, t in TARGETS])
def test_granular_parity(tmp_path, pico_factory, family, target, G):
    dense = pico_factory(family, **DIMS)
    out, plan = upcycle(tmp_path, source=dense, architecture=target, granularity=G,
                        num_experts=4 * G, experts_per_token=2 * G)  # 4 copies, top-k = 2 whole copies
    cfg = json.loads((out / "config.json").read_text())
    n_key = "num_local_experts" if target == "mixtral" else "num_experts"
    size_key = "intermediate_size" if target == "mixtral" else "moe_intermediate_size"
    assert (cfg[n_key], cfg["num_experts_per_tok"], cfg[size_key]) == (4 * G, 2 * G, I // G)
    report = compare_logits(out, dense, device="cpu")
    assert report.max_abs <= 1e-4, report.lines()
    assert report.top1_agreement == 1.0


def test_granular_slices_scales_and_tied_router_rows(tmp_path, pico_factory):
    dense_dir = pico_factory("llama", **DIMS)
    G, u = 2, I // 2
    out, _ = upcycle(tmp_path, source=dense_dir, granularity=G, num_experts=8, experts_per_token=4)
    moe, dense = weights(out), weights(dense_dir)
    for i in range(2):
        gate, up, down = (dense[DENSE.format(i=i, p=p)] for p in ("gate", "up", "down"))
        for e in range(8):
            s = e % G
            assert torch.equal(moe[MIX.format(i=i, e=e, w="w1")], gate[s * u:(s + 1) * u])
            assert torch.equal(moe[MIX.format(i=i, e=e, w="w3")], up[s * u:(s + 1) * u])
            assert torch.equal(moe[MIX.format(i=i, e=e, w="w2")], down[:, s * u:(s + 1) * u] * G)
        router = moe[f"model.layers.{i}.block_sparse_moe.gate.weight"]  # (8, H): rows 2c and 2c+1 identical
        assert torch.equal(router[0::2], router[1::2])
        assert len({tuple(r.tolist()) for r in router[0::2]}) == 4, "copies need distinct router rows"


# --- 2./3. Drop-Upcycling and noise ----------------------------------------------------------------------------

@pytest.mark.parametrize("G,ratio", [(1, 0.25), (2, 0.3)])
def test_drop_upcycling_exact_channel_counts(tmp_path, pico_factory, G, ratio):
    dense_dir = pico_factory("llama", **DIMS)
    u = I // G
    out, plan = upcycle(tmp_path, source=dense_dir, drop_ratio=ratio, granularity=G, num_experts=4 * G,
                        experts_per_token=2 * G)
    moe, dense = weights(out), weights(dense_dir)
    n_drop = round(ratio * u)
    for i in range(2):
        gate, up, down = (dense[DENSE.format(i=i, p=p)] for p in ("gate", "up", "down"))
        chosen = []
        for e in range(4 * G):
            s = slice((e % G) * u, (e % G + 1) * u)
            w1, w3, w2 = (moe[MIX.format(i=i, e=e, w=w)] for w in ("w1", "w3", "w2"))
            rows1 = (w1 != gate[s]).any(dim=1).nonzero().flatten()
            rows3 = (w3 != up[s]).any(dim=1).nonzero().flatten()
            cols2 = (w2 != down[:, s] * G).any(dim=0).nonzero().flatten()
            assert len(rows1) == n_drop, (i, e, len(rows1), n_drop)
            assert torch.equal(rows1, rows3) and torch.equal(rows1, cols2), "gate/up/down drop the same channels"
            keep = torch.ones(u, dtype=torch.bool)
            keep[rows1] = False
            assert torch.equal(w1[keep], gate[s][keep]) and torch.equal(w2[:, keep], (down[:, s] * G)[:, keep])
            fresh = w1[rows1]  # re-drawn from N(mean, std) of the whole dense matrix
            assert abs(fresh.std().item() / gate.std().item() - 1) < 0.3
            chosen.append(set(rows1.tolist()))
        assert len({frozenset(c) for c in chosen}) == len(chosen), "experts drop different channels"
    assert any("Drop-Upcycling" in n and "differ" in n for n in plan.notes)


@pytest.mark.parametrize("axis", [0, 1])
def test_drop_upcycling_redraws_with_the_source_mean_and_std(axis):
    """On a (2048, 1024) matrix with a non-zero mean, the 1M re-drawn values match the source's mean and std
    within 5 standard errors (mean: 5 std/sqrt(n) = 0.0025; std: 5/sqrt(2n) = 0.35 %)."""
    from mergekit_lite.ops.transforms import TRANSFORMS

    g = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 1024, generator=g) * 0.5 + 0.3  # intermediate axis first (gate/up) ...
    w = w if axis == 0 else w.T.contiguous()  # ... or second (down)
    args = {"axis": axis, "start": 0, "size": 2048, "drop": {"ratio": 0.5, "channel_seed": 1, "value_seed": 2}}
    out = TRANSFORMS["ffn_part"]([w], tuple(w.shape), torch.float32, args)
    changed = (out != w).any(dim=1 - axis)
    assert changed.sum().item() == 1024  # exactly ratio * size channels re-drawn, the rest kept as they were
    fresh = out.index_select(axis, changed.nonzero().flatten())
    n = fresh.numel()
    assert n == 1024 * 1024
    assert abs(fresh.mean().item() - w.mean().item()) < 5 * w.std().item() / math.sqrt(n)
    assert abs(fresh.std().item() / w.std().item() - 1) < 5 / math.sqrt(2 * n)
    kept = (~changed).nonzero().flatten()
    assert torch.equal(out.index_select(axis, kept), w.index_select(axis, kept))


def test_noise_is_relative_seeded_and_breaks_identity(tmp_path, pico_factory):
    dense_dir = pico_factory("qwen2", **DIMS)
    a, plan = upcycle(tmp_path, "a", source=dense_dir, noise=0.1)
    b, _ = upcycle(tmp_path, "b", source=dense_dir, noise=0.1)
    c, _ = upcycle(tmp_path, "c", source=dense_dir, noise=0.1, seed=1)
    wa, wb, wc, dense = weights(a), weights(b), weights(c), weights(dense_dir)
    gate = dense[DENSE.format(i=1, p="gate")]
    experts = [wa[QWEN.format(i=1, e=e, p="gate")] for e in range(4)]
    for w in experts:
        assert abs((w - gate).std().item() / gate.std().item() - 0.1) < 0.02
    assert not torch.equal(experts[0], experts[1])
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "same seed, same bytes"
    assert not torch.equal(wa[QWEN.format(i=1, e=0, p="gate")], wc[QWEN.format(i=1, e=0, p="gate")])
    assert any("expert noise" in n for n in plan.notes)


# --- 4. shared experts -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("G,n", [(1, 1), (2, 2)])
def test_shared_split_keeps_parity(tmp_path, pico_factory, G, n):
    dense_dir = pico_factory("qwen2", **DIMS)
    u = I // (G + n)
    out, plan = upcycle(tmp_path, source=dense_dir, shared_experts=n, shared_split=True, granularity=G,
                        num_experts=4 * G, experts_per_token=2 * G)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["shared_expert_intermediate_size"], cfg["moe_intermediate_size"]) == (n * u, u)
    moe, dense = weights(out), weights(dense_dir)
    gate, down = dense[DENSE.format(i=0, p="gate")], dense[DENSE.format(i=0, p="down")]
    assert torch.equal(moe["model.layers.0.mlp.shared_expert.gate_proj.weight"], gate[:n * u])
    assert torch.equal(moe["model.layers.0.mlp.shared_expert.down_proj.weight"], down[:, :n * u] * 2)
    assert torch.equal(moe[QWEN.format(i=0, e=G - 1, p="gate")], gate[n * u + (G - 1) * u:])
    assert not moe["model.layers.0.mlp.shared_expert_gate.weight"].any()
    report = compare_logits(out, dense_dir, device="cpu")
    assert report.max_abs <= 1e-4, report.lines()
    assert any("parity kept" in x for x in plan.notes)


def test_shared_without_split_is_added_and_says_so(tmp_path, pico_factory):
    dense_dir = pico_factory("qwen2", **DIMS)
    lines: list[str] = []
    run_upcycle(recipe(tmp_path, source=dense_dir, shared_experts=1), None, dry_run=True, echo=lines.append)
    assert any("shared_split: true" in x and "differ" in x for x in lines)
    out, _ = upcycle(tmp_path, source=dense_dir, shared_experts=1)
    moe, dense = weights(out), weights(dense_dir)
    assert torch.equal(moe["model.layers.1.mlp.shared_expert.up_proj.weight"], dense[DENSE.format(i=1, p="up")])
    assert compare_logits(out, dense_dir, device="cpu").max_abs > 1e-3  # dense FFN + 0.5 x shared copy


# --- 5. experts from several dense models ----------------------------------------------------------------------

def test_experts_from_several_models(tmp_path, pico_factory):
    a, b = pico_factory("llama", **DIMS), pico_factory("llama", seed=1, **DIMS)
    out, plan = upcycle(tmp_path, experts=[{"source": str(a)}, {"source": str(b)}, {"source": str(b), "noise": 0.1}],
                        num_experts=None, experts_per_token=2, base=str(a))
    moe, wa, wb = weights(out), weights(a), weights(b)
    for i in range(2):
        for w, p in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
            assert torch.equal(moe[MIX.format(i=i, e=0, w=w)], wa[DENSE.format(i=i, p=p)])
            assert torch.equal(moe[MIX.format(i=i, e=1, w=w)], wb[DENSE.format(i=i, p=p)])
            assert not torch.equal(moe[MIX.format(i=i, e=2, w=w)], wb[DENSE.format(i=i, p=p)])
    assert torch.equal(moe["model.layers.1.self_attn.q_proj.weight"], wa["model.layers.1.self_attn.q_proj.weight"])
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 3
    assert plan.sources == [a, b]
    avg, _ = upcycle(tmp_path, "avg", experts=[{"source": str(a)}, {"source": str(b)}], num_experts=None,
                     experts_per_token=1, non_expert="average")
    wv = weights(avg)
    for key in ("model.layers.0.self_attn.o_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.allclose(wv[key], (wa[key] + wb[key]) / 2, atol=1e-7)
    assert math.isfinite(compare_logits(avg, a, device="cpu").max_abs)  # loads and runs in transformers


def test_mismatched_experts_refused_before_heavy_io(tmp_path, pico_factory, no_heavy_io):
    a, wide, qwen = (pico_factory("llama", **DIMS), pico_factory("llama", **{**DIMS, "intermediate_size": 96}),
                     pico_factory("qwen2", **DIMS))
    for other, words in ((wide, ["identical shapes", "32/96/2", "32/64/2"]), (qwen, ["qwen2", "llama"])):
        r = recipe(tmp_path, experts=[{"source": str(a)}, {"source": str(other)}], experts_per_token=1,
                   num_experts=None)
        with pytest.raises(MoemergeError) as e:
            run_upcycle(r, tmp_path / "never", echo=quiet)
        assert all(w in str(e.value) for w in words), str(e.value)
        assert not (tmp_path / "never").exists()


# --- 6. prompt-based router --------------------------------------------------------------------------------------

THEMES = [["one", "two", "three", "four", "five", "six"], ["red", "green", "blue", "yellow", "purple", "orange"],
          ["cat", "dog", "horse", "sheep", "goat", "lion"], ["Paris", "London", "Berlin", "Madrid", "Rome", "Oslo"]]


@pytest.fixture(scope="module")
def topical_llama(tmp_path_factory):
    """A pico Llama whose FFN inputs carry token identity, as a trained model's carry topic.

    With random weights, attention mixes context so strongly that a prompt's hidden states say little about
    its words; damping o_proj (x0.1) leaves the residual stream dominated by the tokens themselves.
    """
    d = build_pico_model("llama", tmp_path_factory.mktemp("topical"), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, texts=[" ".join(sum(THEMES, []))] * 8)
    sd = load_file(d / "model.safetensors")
    save_file({k: v * 0.1 if "o_proj" in k else v for k, v in sd.items()}, d / "model.safetensors",
              metadata={"format": "pt"})
    return d


def test_prompt_router_routes_prompts_to_their_expert(tmp_path, topical_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rng = random.Random(0)
    prompts = [[" ".join(rng.sample(words, 4)) for _ in range(4)] for words in THEMES]
    r = recipe(tmp_path, source=topical_llama, num_experts=8, experts_per_token=2, granularity=2,
               router={"init": "hidden", "prompts": prompts})
    result = CliRunner().invoke(app, ["upcycle", str(r), "-o", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    logits: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(lambda m, x, o, i=i: logits.__setitem__(i, o[0]))
    hits = total = 0
    with torch.no_grad():
        for copy, theme in enumerate(prompts):
            for p in theme:
                model(**tok(p, return_tensors="pt"))
                for lg in logits.values():  # (T, 8) -> the copy with the highest mean score
                    hits += int(lg.mean(0).argmax()) // 2 == copy
                    total += 1
    assert hits / total >= 0.9, f"{hits}/{total} (prompt, layer) pairs routed to their own expert"


def test_prompt_router_rows_are_normalised_mean_ffn_inputs(tmp_path, pico_factory):
    """Independent check: means taken at the MoE block's input (a pre-hook on `mlp`), positive minus negative."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense = pico_factory("qwen2", **DIMS)
    pos, neg = [["the quick brown fox"], ["a mixture of experts", "routes every token"]], [["sparse"], []]
    out, _ = upcycle(tmp_path, source=dense, num_experts=2, experts_per_token=1,
                     router={"init": "hidden", "prompts": pos, "negative_prompts": neg})
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(dense)
    seen: dict[int, list[torch.Tensor]] = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda m, x, i=i: seen.setdefault(i, []).append(x[0][0]))

    def means(texts):
        seen.clear()
        with torch.no_grad():
            for t in texts:
                model(**tok(t, return_tensors="pt"))
        return {i: torch.cat(v).mean(0) for i, v in seen.items()}  # (H,) per layer

    mp, mn = [means(p) for p in pos], [means(n) if n else None for n in neg]
    moe = weights(out)
    for i in range(2):
        want = torch.stack([p[i] - (n[i] if n else 0) for p, n in zip(mp, mn)])
        got = moe[f"model.layers.{i}.mlp.gate.weight"]
        assert torch.allclose(got, torch.nn.functional.normalize(want, dim=-1), atol=1e-5)


# --- 7. partial MoE, active parameters and inspect ---------------------------------------------------------------

@pytest.mark.parametrize("family,target", TARGETS[1:], ids=[t for _, t in TARGETS[1:]])
def test_partial_moe_parity_params_and_inspect(tmp_path, pico_factory, family, target):
    dense = pico_factory(family, **DIMS)
    extra = {"shared_experts": 2, "shared_split": True} if target == "qwen2_moe" else {}
    out, plan = upcycle(tmp_path, source=dense, architecture=target, moe_layers={"every": 2}, granularity=2,
                        num_experts=8, experts_per_token=4, **extra)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mlp_only_layers"] == [0] and cfg["intermediate_size"] == I
    keys = weights(out)
    assert keys[DENSE.format(i=0, p="up")].shape == (I, H) and QWEN.format(i=0, e=0, p="up") not in keys
    assert DENSE.format(i=1, p="up") not in keys and QWEN.format(i=1, e=7, p="up") in keys
    report = compare_logits(out, dense, device="cpu")
    assert report.max_abs <= 1e-4, report.lines()
    # active parameters, counted independently from the model transformers builds
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert plan.total_params == total
    assert plan.active_params == total - experts * (8 - 4) // 8 == describe(out)["active_params"]
    text = "\n".join(describe_lines(describe(out)))
    assert "granularity 2" in text and "MoE layers: [1]" in text and f"copies 0-3: {dense}" in text
    if extra:
        assert "shared experts: 2 (size 32, split True)" in text


def test_inspect_shows_drop_noise_and_sources(tmp_path, pico_factory):
    a, b = pico_factory("llama", **DIMS), pico_factory("llama", seed=1, **DIMS)
    out, _ = upcycle(tmp_path, experts=[{"source": str(a), "drop_ratio": 0.5}, {"source": str(b)}],
                     num_experts=None, experts_per_token=1, drop_ratio=0.25)
    result = CliRunner().invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert f"copy 0: {a}   noise 0.0   drop_ratio 0.5" in result.output
    assert f"copy 1: {b}   noise 0.0   drop_ratio 0.25" in result.output
    assert "non-expert weights: base" in result.output


# --- invalid combinations ------------------------------------------------------------------------------------------

BAD = [
    ("llama", {"granularity": 3, "num_experts": 6, "experts_per_token": 3}, ["granularity=3", "does not divide", "64", "set granularity to one of [1, 2, 4, 8, 16, 32, 64]"]),
    ("llama", {"drop_ratio": 1.0}, ["drop_ratio = 1.0", "less than 1"]),
    ("llama", {"drop_ratio": -0.1}, ["drop_ratio = -0.1", "greater than or equal to 0"]),
    ("llama", {"router": {"init": "hidden"}}, ["router.init=hidden needs prompts"]),
    ("llama", {"router": {"init": "hidden", "prompts": [["a"]]}}, ["router.prompts needs 4 non-empty lists"]),
    ("llama", {"router": {"init": "random", "prompts": [["a"]] * 4}}, ["only used with router.init=hidden"]),
    ("llama", {"moe_layers": [1]}, ["moe_layers=[1]", "mixtral has no dense layers"]),
    ("qwen2", {"moe_layers": [5]}, ["layers [5] do not exist", "2 layers"]),
    ("qwen2", {"moe_layers": {"every": 3}}, ["selects no layer"]),
    ("llama", {"granularity": 4, "num_experts": 6}, ["num_experts=6 is not a multiple of granularity=4"]),
    ("llama", {"granularity": 2, "num_experts": 8, "experts_per_token": 3}, ["experts_per_token=3", "multiple"]),
    ("llama", {"granularity": 2, "router": {"init": "zeros"}}, ["zeros", "incomplete"]),
    ("llama", {"shared_experts": 1}, ["shared_experts=1", "mixtral has no shared expert",
                                      "use architecture: ernie4_5_moe / glm4_moe / granitemoeshared / moemerge / "
                                      "qwen2_moe,"]),
    ("qwen3", {"shared_experts": 1}, ["qwen3_moe has no shared expert"]),
    ("qwen2", {"shared_split": True}, ["shared_split: true needs shared_experts"]),
    ("qwen2", {"shared_experts": 1, "shared_split": True, "granularity": 2, "experts_per_token": 2},
     ["granularity + shared_experts = 2 + 1 = 3", "does not divide", "64", "set shared_experts to one of [2, 6, 14, 30]"]),
    ("llama", {"experts": [{"source": "x"}]}, ["either `source` or `experts:`"]),
    ("llama", {"base": "x"}, ["only apply with an `experts:` list"]),
]


@pytest.mark.parametrize("family,fields,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_invalid_combinations_refused_before_heavy_io(tmp_path, pico_factory, no_heavy_io, family, fields, words):
    body = {"source": pico_factory(family, **DIMS), **fields}
    with pytest.raises(MoemergeError) as e:
        run_upcycle(recipe(tmp_path, **body), tmp_path / "never", echo=quiet)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "never").exists()


def test_experts_list_count_and_prompt_placement_errors(tmp_path):
    two = [{"source": "a"}, {"source": "b", "prompts": ["x"]}]
    cases = [({"experts": two[:1], "num_experts": 3, "experts_per_token": 1}, "set num_experts: 1"),
             ({"experts": two, "experts_per_token": 1, "router": {"init": "hidden"}}, "experts [0] have no `prompts`"),
             ({"experts": two, "experts_per_token": 1, "router": {"init": "hidden", "prompts": [["y"], ["z"]]}},
              "both under `router:` and under `experts:`"),
             ({"num_experts": 2, "experts_per_token": 1}, "`source` is missing")]
    for body, words in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(body))
        with pytest.raises(MoemergeError, match=words.replace("[", r"\[").replace("]", r"\]")):
            run_upcycle(path, tmp_path / "never", echo=quiet)
