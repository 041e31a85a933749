"""`moemerge ensemble`: averaging, weighting, KV caching, crowd vote, --score, and the refusals (issue 16)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mergekit_lite.cli import app
from mergekit_lite.ensemble.combine import (
    combine,
    lcs_length,
    normalise,
    perplexity_weights,
    pick_token,
    prefix_mean_nll,
    rouge_l,
    token_f1,
    vote,
)
from mergekit_lite.ensemble.decode import generate
from mergekit_lite.ensemble.members import read_prompts
from mergekit_lite.ensemble.run import run_ensemble
from mergekit_lite.errors import MoemergeError
from mergekit_lite.pico import SAMPLE_TEXT
from mergekit_lite.recipe import EnsembleRecipe, Generation, validate_recipe

runner = CliRunner()
PROMPTS = ["The quick brown fox", "A mixture of experts routes", "Sparse upcycling starts"]


def quiet(*_):
    pass


def write_recipe(tmp_path, models, name="r.yaml", **kw):
    body = {"models": [str(m) if not isinstance(m, dict) else m for m in models], "prompts": PROMPTS,
            "generation": {"max_new_tokens": 10}, "score": {"seq_len": 32, "batch_size": 8}, **kw}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def ensemble(path, **kw) -> dict:
    return run_ensemble(path, progress=False, echo=quiet, raw=quiet, **kw)


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def pair(pico_factory):
    """Two pico Llamas with one tokenizer (same training text) and different weights."""
    return pico_factory("llama"), pico_factory("llama", seed=1)


@pytest.fixture(scope="module")
def score_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("score") / "text.txt"
    path.write_text("\n".join([SAMPLE_TEXT, SAMPLE_TEXT[::-1], SAMPLE_TEXT.upper()]) + "\n")
    return path


# --- combine: the maths, by hand -------------------------------------------------------------------------------

def test_probs_is_the_weighted_mixture_and_logits_the_weighted_geometric_mean():
    p1, p2 = torch.tensor([0.9, 0.1]), torch.tensor([0.1, 0.9])
    logits = torch.stack([p1.log() + 3.0, p2.log() - 1.0])  # softmax ignores a shift per member
    mix = combine(logits, normalise([1, 3]), "probs").exp()
    assert torch.allclose(mix, torch.tensor([0.25 * 0.9 + 0.75 * 0.1, 0.25 * 0.1 + 0.75 * 0.9]), atol=1e-6)
    geo = torch.tensor([0.9 ** 0.25 * 0.1 ** 0.75, 0.1 ** 0.25 * 0.9 ** 0.75])
    assert torch.allclose(combine(logits - torch.tensor([[3.0], [-1.0]]), normalise([1, 3]), "logits").exp(),
                          geo / geo.sum(), atol=1e-6)
    # a zero weight drops a member
    assert torch.allclose(combine(logits, normalise([0, 1]), "probs").exp(), p2, atol=1e-6)


def test_normalise_and_perplexity_weights():
    assert normalise([1, 3]).tolist() == [0.25, 0.75]
    w = perplexity_weights([1.0, 2.0])
    assert w.tolist() == pytest.approx([1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))])
    assert perplexity_weights([1.0, 2.0], temperature=1e6).tolist() == pytest.approx([0.5, 0.5], abs=1e-6)
    assert perplexity_weights([1.0, 2.0], temperature=1e-3).tolist() == pytest.approx([1.0, 0.0])
    # --score: a position's weights come from the NLL of the positions before it only
    nll = torch.tensor([[[2.0, 4.0, 6.0]]])
    assert prefix_mean_nll(nll).tolist() == [[[0.0, 2.0, 3.0]]]


def test_pick_token_greedy_top_p_and_seed():
    lp = torch.log_softmax(torch.tensor([0.0, 2.0, 1.0, -1.0]), -1)
    assert pick_token(lp, do_sample=False) == 1
    assert {pick_token(lp, do_sample=True, top_p=0.3, generator=torch.Generator().manual_seed(s))
            for s in range(20)} == {1}  # the nucleus holds only the top token
    draws = [pick_token(lp, do_sample=True, generator=torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) == {0, 1, 2, 3}
    again = [pick_token(lp, do_sample=True, generator=torch.Generator().manual_seed(s)) for s in range(200)]
    assert draws == again
    cold = [pick_token(lp, do_sample=True, temperature=0.05, generator=torch.Generator().manual_seed(s))
            for s in range(50)]
    assert set(cold) == {1}


# --- similarity and vote -----------------------------------------------------------------------------------------

def test_lcs_and_rouge_l_by_hand():
    assert lcs_length("abcbdab", "bdcaba") == 4
    assert lcs_length([], [1, 2]) == 0
    a, b = [1, 2, 3], [1, 2, 4, 5]  # LCS 2: P = 2/3, R = 2/4
    assert rouge_l(a, b) == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert rouge_l(a, b) == rouge_l(b, a)
    assert rouge_l(a, a) == 1.0 and rouge_l([], []) == 1.0 and rouge_l(a, []) == 0.0 and rouge_l(a, [9]) == 0.0
    assert rouge_l([1, 2, 3], [3, 2, 1]) == pytest.approx(1 / 3)  # order matters for ROUGE-L ...
    assert token_f1([1, 2, 3], [3, 2, 1]) == 1.0  # ... and not for the bag of tokens


def test_vote_picks_the_most_agreed_candidate():
    cands = [["a", "b", "c"], ["a", "b", "d", "e"], ["a", "b", "c", "d"], ["x", "y"]]
    best, scores = vote(cands)
    s01, s02, s12 = rouge_l(cands[0], cands[1]), rouge_l(cands[0], cands[2]), rouge_l(cands[1], cands[2])
    assert scores == pytest.approx([s01 + s02, s01 + s12, s02 + s12, 0.0])
    assert best == 2


def test_vote_ties_go_to_the_lower_index():
    assert vote([["a"], ["b"]]) == (0, [0.0, 0.0])
    assert vote([["b"], ["a"], ["a"]])[0] == 1
    assert vote([["q"], ["a"], ["a"], ["q"]])[0] == 0


# --- decoding ---------------------------------------------------------------------------------------------------

def test_one_model_equals_model_generate(tmp_path, pair):
    model, tok = load(pair[0])
    out = ensemble(write_recipe(tmp_path, [pair[0]]))["outputs"]
    for prompt, got in zip(PROMPTS, out):
        ids = tok(prompt, return_tensors="pt").input_ids
        ref = model.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:]
        assert got["text"] == tok.decode(ref, skip_special_tokens=True)
        assert got["weights"] == [1.0]
        mine, _, _ = generate([model], ids, method="probs", weights=[1.0], vocab=len(tok),
                              generation=Generation(max_new_tokens=10), eos={tok.eos_token_id})
        assert mine == ref.tolist()


@pytest.mark.parametrize("method", ["probs", "logits"])
def test_two_copies_give_the_models_tokens(tmp_path, pair, method):
    gen = {"max_new_tokens": 10, "do_sample": True, "temperature": 0.7, "seed": 5}
    alone = ensemble(write_recipe(tmp_path, [pair[0]], "one.yaml", method=method, generation=gen))["outputs"]
    two = ensemble(write_recipe(tmp_path, [pair[0], pair[0]], "two.yaml", method=method, weights=[1, 3],
                                generation=gen))["outputs"]
    assert [o["text"] for o in two] == [o["text"] for o in alone]
    assert two[0]["weights"] == [0.25, 0.75]
    greedy = ensemble(write_recipe(tmp_path, [pair[0], pair[0]], "g.yaml", method=method))["outputs"]
    greedy_alone = ensemble(write_recipe(tmp_path, [pair[0]], "g1.yaml", method=method))["outputs"]
    assert [o["text"] for o in greedy] == [o["text"] for o in greedy_alone]


def _count_forwards(model) -> list[int]:
    """Sequence length of every forward call of `model`."""
    lengths: list[int] = []
    model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    return lengths


@pytest.mark.parametrize("method,weights", [("probs", [0.3, 0.7]), ("logits", [0.3, 0.7]), ("probs", None)])
def test_kv_cache_one_token_per_step_and_equal_to_recomputation(pair, method, weights):
    (a, tok), (b, _) = load(pair[0]), load(pair[1])
    calls = [_count_forwards(a), _count_forwards(b)]
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    n = 12
    tokens, w, _ = generate([a, b], ids, method=method, weights=weights, vocab=len(tok),
                            generation=Generation(max_new_tokens=n), eos=set())
    assert len(tokens) == n
    for lengths in calls:  # the prompt once, then one token per step; the last token is never fed
        assert lengths == [ids.shape[1]] + [1] * (n - 1)
    # cache-free: run each model on the whole sequence at every step and combine the last position
    seq = ids[0].tolist()
    if weights is None:
        with torch.no_grad():
            nll = [m(input_ids=ids, labels=ids).loss.item() for m in (a, b)]
        assert w == pytest.approx(perplexity_weights(nll).tolist(), abs=1e-6)
    ref = []
    with torch.no_grad():
        for _ in range(n):
            last = torch.stack([m(input_ids=torch.tensor([seq])).logits[0, -1, :len(tok)] for m in (a, b)])
            ref.append(int(combine(last, torch.tensor(w), method).argmax()))
            seq.append(ref[-1])
    assert tokens == ref


def test_perplexity_weights_are_printed(tmp_path, pair):
    path = write_recipe(tmp_path, list(pair), weights="perplexity", temperature_ppl=0.5)
    result = runner.invoke(app, ["ensemble", str(path)])
    assert result.exit_code == 0, result.output
    model, tok = load(pair[0])
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        nll = [load(p)[0](input_ids=ids, labels=ids).loss.item() for p in pair]
    w = perplexity_weights(nll, 0.5).tolist()
    line = f"weights (perplexity, temperature 0.5): {pair[0]} {w[0]:.3f}, {pair[1]} {w[1]:.3f}; prompt perplexity " \
           f"{math.exp(nll[0]):.2f}, {math.exp(nll[1]):.2f}"
    assert line in result.stdout


def test_vote_end_to_end_prints_candidates(tmp_path, pair):
    path = write_recipe(tmp_path, [pair[0], pair[1], pair[0]], method="vote")
    out = ensemble(path)["outputs"]
    alone = ensemble(write_recipe(tmp_path, [pair[0]], "one.yaml"))["outputs"]
    for o, ref in zip(out, alone):
        assert [c["model"] for c in o["candidates"]] == [str(pair[0]), str(pair[1]), str(pair[0])]
        s = [c["score"] for c in o["candidates"]]
        # two identical candidates: each scores 1 + sim(a, b), the odd one 2 sim(a, b)
        assert s[0] == s[2] and s[0] >= s[1]
        assert o["text"] == ref["text"] == o["candidates"][0]["text"]
    result = runner.invoke(app, ["ensemble", str(path)])
    assert result.exit_code == 0, result.output
    assert "candidates (rouge_l summed over the others):" in result.stdout and " *[0] " in result.stdout


def test_json_output_and_progress_bar(tmp_path, pair, monkeypatch):
    txt = tmp_path / "prompts.jsonl"
    txt.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    path = write_recipe(tmp_path, list(pair), prompts=str(txt))
    result = runner.invoke(app, ["ensemble", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data) == ["outputs"] and len(data["outputs"]) == 3
    assert [list(o) for o in data["outputs"]] == [["prompt", "text", "weights", "candidates"]] * 3
    assert [o["prompt"] for o in data["outputs"]] == PROMPTS
    assert data["outputs"][0]["weights"] == [0.5, 0.5] and data["outputs"][0]["candidates"] == []
    assert "3/3" in result.stderr and "prompt" in result.stderr


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  \nsecond line\n")
    assert read_prompts("p.txt", tmp_path / "r.yaml") == ["first", "second line"]  # beside the recipe
    (tmp_path / "p.jsonl").write_text('{"text": "a"}\n{"text": "b c"}\n')
    assert read_prompts(str(tmp_path / "p.jsonl"), "r.yaml") == ["a", "b c"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(MoemergeError, match="line 1 is not a JSON object with a string `text`"):
        read_prompts(str(tmp_path / "bad.jsonl"), "r.yaml")


def test_members_may_be_an_upcycled_moe(tmp_path, pair, score_text):
    from mergekit_lite.ops.upcycle import run_upcycle

    up = tmp_path / "up.yaml"
    up.write_text(yaml.safe_dump({"source": str(pair[0]), "num_experts": 4, "experts_per_token": 2,
                                  "dtype": "float32"}))
    run_upcycle(up, tmp_path / "moe", echo=quiet)
    mixed = ensemble(write_recipe(tmp_path, [pair[0], tmp_path / "moe"]))["outputs"]
    dense = ensemble(write_recipe(tmp_path, [pair[0]], "d.yaml"))["outputs"]
    assert [o["text"] for o in mixed] == [o["text"] for o in dense]  # the MoE reproduces the dense model
    scores = ensemble(write_recipe(tmp_path, [pair[0], tmp_path / "moe"]), score=score_text)
    dense_loss, moe_loss = (m["loss"] for m in scores["members"])
    assert abs(moe_loss - dense_loss) < 1e-4 and abs(scores["ensemble"]["loss"] - dense_loss) < 1e-4


def test_padded_embedding_is_a_valid_member(tmp_path, pair):
    model, tok = load(pair[0])
    n = len(tok)
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    top = int(model(input_ids=ids).logits[0, -1].argmax())
    model.resize_token_embeddings(n + 64, mean_resizing=False)  # rows beyond the tokenizer's ids, as many Hub models
    with torch.no_grad():  # padded rows that would win the first argmax if logits were not cut
        model.lm_head.weight[n:] = 3 * model.lm_head.weight[top]
    model.save_pretrained(tmp_path / "padded")
    tok.save_pretrained(tmp_path / "padded")
    assert int(model(input_ids=ids).logits[0, -1].argmax()) >= n
    out, _, _ = generate([model], ids, method="probs", weights=[1.0], vocab=n,
                         generation=Generation(max_new_tokens=10), eos=set())
    assert max(out) < n
    both = ensemble(write_recipe(tmp_path, [pair[0], tmp_path / "padded"]))["outputs"]
    alone = ensemble(write_recipe(tmp_path, [pair[0]], "one.yaml"))["outputs"]
    assert [o["text"] for o in both] == [o["text"] for o in alone]  # same weights, cut logits: same model twice


# --- --score ----------------------------------------------------------------------------------------------------

def packed_like_train(tok, path, seq_len: int) -> torch.Tensor:
    """Documents joined with EOS and cut into seq_len blocks, written out here without the package's code."""
    stream: list[int] = []
    for line in path.read_text().splitlines():
        if line:
            stream += tok(line, add_special_tokens=False).input_ids + [tok.eos_token_id]
    n = len(stream) // seq_len
    return torch.tensor(stream[:n * seq_len]).view(n, seq_len)  # [blocks, seq_len]


def test_score_of_one_model_is_its_own_loss(tmp_path, pair, score_text):
    model, tok = load(pair[0])
    blocks = packed_like_train(tok, score_text, 32)
    with torch.no_grad():
        own = torch.stack([model(input_ids=b[None], labels=b[None]).loss for b in blocks]).mean().item()
    got = ensemble(write_recipe(tmp_path, [pair[0]]), score=score_text)
    assert got == {"members": [{"model": str(pair[0]), "loss": pytest.approx(own, abs=1e-5)}],
                   "ensemble": {"loss": pytest.approx(own, abs=1e-5)}}


@pytest.mark.parametrize("method,weights", [("probs", [1, 3]), ("logits", [1, 3]), ("probs", "perplexity")])
def test_score_ensemble_loss_by_hand(tmp_path, pair, score_text, method, weights):
    (a, tok), (b, _) = load(pair[0]), load(pair[1])
    blocks = packed_like_train(tok, score_text, 32)
    with torch.no_grad():
        lp = torch.stack([torch.log_softmax(m(input_ids=blocks).logits[:, :-1], -1) for m in (a, b)])  # [2,N,T,V]
    target = blocks[:, 1:, None].expand(2, -1, -1, 1)
    member_nll = -lp.gather(-1, target)[..., 0]  # [2, N, T-1]
    if weights == "perplexity":  # each position weighted by the members' perplexity on the tokens before it
        n_before = torch.arange(member_nll.shape[-1]).clamp_min(1)
        w = torch.softmax(-(member_nll.cumsum(-1) - member_nll) / n_before, dim=0)[..., None]
    else:
        w = torch.tensor([0.25, 0.75]).view(2, 1, 1, 1)
    if method == "probs":
        ens = -torch.log((w * lp.exp()).sum(0)).gather(-1, blocks[:, 1:, None])
    else:
        ens = -torch.log_softmax((w * lp).sum(0), -1).gather(-1, blocks[:, 1:, None])
    got = ensemble(write_recipe(tmp_path, list(pair), method=method, weights=weights), score=score_text)
    assert got["ensemble"]["loss"] == pytest.approx(ens.mean().item(), abs=1e-5)
    assert [m["loss"] for m in got["members"]] == pytest.approx(member_nll.mean((1, 2)).tolist(), abs=1e-5)


def test_score_table_and_json(tmp_path, pair, score_text):
    path = write_recipe(tmp_path, list(pair))
    result = runner.invoke(app, ["ensemble", str(path), "--score", str(score_text), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data) == ["members", "ensemble"] and [list(m) for m in data["members"]] == [["model", "loss"]] * 2
    result = runner.invoke(app, ["ensemble", str(path), "--score", str(score_text)])
    assert "mean of the members" in result.stdout and "ensemble (probs, equal weights)" in result.stdout


def _train_on(model_dir, blocks: torch.Tensor, out, steps: int, seed: int):
    """A few AdamW steps of next-token training on `blocks` [N, T]; saves the model (and tokenizer) to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (8,), generator=g)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(out)
    return out


def test_jensen_probability_ensemble_beats_the_members_mean(tmp_path_factory):
    """Two pico models trained on different halves of the quickstart corpus; held-out text scored."""
    from transformers import AutoTokenizer

    from mergekit_lite.pico import build_pico_model
    from mergekit_lite.train.corpus import stdlib_docstrings, write_corpus

    root = tmp_path_factory.mktemp("jensen")
    train_txt, val_txt = write_corpus(root / "corpus")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    base = build_pico_model("llama", root / "base", texts=stdlib_docstrings(), **small)
    tok = AutoTokenizer.from_pretrained(str(base))
    blocks = packed_like_train(tok, train_txt, 32)
    half = len(blocks) // 2
    a = _train_on(base, blocks[:half], root / "a", steps=20, seed=1)
    b = _train_on(base, blocks[half:], root / "b", steps=20, seed=2)
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump({"models": [str(a), str(b)], "score": {"seq_len": 32, "batch_size": 8}}))
    lines: list[str] = []
    got = run_ensemble(recipe, score=val_txt, progress=False, echo=lines.append, raw=quiet)
    print("\n".join(lines))
    losses = [m["loss"] for m in got["members"]]
    (root / "base.yaml").write_text(yaml.safe_dump({"models": [str(base)], "score": {"seq_len": 32}}))
    untrained = run_ensemble(root / "base.yaml", score=val_txt, progress=False, echo=quiet, raw=quiet)
    print(f"untrained base: {untrained['ensemble']['loss']:.4f}")
    assert max(losses) < untrained["ensemble"]["loss"] - 1.0  # both learned something
    assert got["ensemble"]["loss"] <= sum(losses) / 2
    assert got["ensemble"]["loss"] < min(losses)  # trained on different halves, the mixture beats both


# --- refusals ---------------------------------------------------------------------------------------------------

def test_different_vocabularies_are_refused_before_loading(tmp_path, pair, pico_factory, no_weights_loaded):
    other = pico_factory("llama", texts=["completely different words " * 20, "zebra quartz jump"])
    path = write_recipe(tmp_path, [pair[0], other])
    with pytest.raises(MoemergeError) as e:
        ensemble(path)
    msg = str(e.value)
    assert msg.startswith(f"models[1] ({other}): its vocabulary differs from models[0] ({pair[0]}) at token id ")
    from transformers import AutoTokenizer

    from mergekit_lite.ensemble.members import first_difference, id_to_token

    ta, tb = (id_to_token(AutoTokenizer.from_pretrained(str(p))) for p in (pair[0], other))
    i = first_difference(ta, tb)
    assert f"at token id {i}: {tb[i]!r} there, {ta[i]!r} in models[0]" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("body,expected", [
    ({"method": "vote"}, "method = 'vote': 'vote' needs at least 2 models"),
    ({"weights": [1, 2]}, "weights = [1, 2]: 2 weights for 1 models; give one per model"),
    ({"models": ["A", "B"], "weights": [1, -1]}, "a weight is negative"),
    ({"models": ["A", "B"], "weights": [0, 0]}, "the weights sum to 0"),
    ({"models": ["A", {"model": "B", "weight": 1}]}, "1 of 2 models have a weight"),
    ({"models": ["A", "B"], "method": "vote", "weights": [1, 2]}, "'vote' counts every candidate equally"),
    ({"wieghts": [1]}, "wieghts = [1]: unknown key (did you mean 'weights'?)"),
])
def test_recipe_refusals(body, expected):
    with pytest.raises(MoemergeError, match=re.escape(expected)):
        validate_recipe({"models": ["A"], **body}, EnsembleRecipe, "r.yaml")


def test_cli_errors_are_one_line_before_loading(tmp_path, pair, no_weights_loaded):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (write_recipe(tmp_path, [pair[0]], "e.yaml", prompts=str(empty)), [], "holds no prompt"),
        (write_recipe(tmp_path, [pair[0]], "v.yaml", method="vote"), [], "needs at least 2 models"),
        (write_recipe(tmp_path, list(pair), "w.yaml", weights=[1]), [], "1 weights for 2 models"),
        (write_recipe(tmp_path, list(pair), "n.yaml", weights=[1, -2]), [], "a weight is negative"),
        (write_recipe(tmp_path, list(pair), "m.yaml", prompts=str(tmp_path / "missing.txt")), [], "file not found"),
        (write_recipe(tmp_path, list(pair), "s.yaml"), ["--score", tmp_path / "nope.txt"], "--score"),
        (write_recipe(tmp_path, list(pair), "d.yaml"), ["--device", "cuda:7"], "--device cuda:7"),
    ]
    for path, extra, expected in cases:
        result = runner.invoke(app, ["ensemble", str(path), *map(str, extra)])
        assert result.exit_code != 0, (path, result.output)
        assert isinstance(result.exception, MoemergeError), (path, result.exception)
        assert expected in str(result.exception), (expected, str(result.exception))
        lines = str(result.exception).splitlines()
        assert len(lines) <= 2 and (len(lines) == 1 or lines[0].startswith("invalid recipe")), lines


def test_score_refuses_vote(tmp_path, pair, score_text):
    with pytest.raises(MoemergeError, match="--score needs method probs or logits"):
        ensemble(write_recipe(tmp_path, list(pair), method="vote"), score=score_text)


def test_members_load_in_the_recipe_dtype_on_accelerates_device(pair):
    from accelerate import PartialState

    from mergekit_lite.ensemble.members import load_members, prepare_members

    recipe = validate_recipe({"models": [str(p) for p in pair], "dtype": "bfloat16"}, EnsembleRecipe)
    members, tok, vocab = prepare_members(recipe, "r.yaml")
    assert vocab == len(tok) and all(m.model is None for m in members)  # tokenizers only so far
    load_members(members, recipe.dtype, PartialState().device)
    assert {(m.model.dtype, m.model.device.type, m.model.training) for m in members} == \
        {(torch.bfloat16, PartialState().device.type, False)}
