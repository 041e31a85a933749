"""`moemerge ensemble` methods `exchange` (Exchange-of-Thought) and `fuse`, across vocabularies (issue 28).

The round logic is checked with scripted members (plain functions of the prompt text); the generation side
end to end through the CLI with pico models whose tokenizers differ.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mergekit_lite.cli import app
from mergekit_lite.ensemble.exchange import confidence, exchange, extract, final_answer, fuse, visible
from mergekit_lite.ensemble.run import run_ensemble
from mergekit_lite.ensemble.speakers import prompt_ids
from mergekit_lite.errors import MoemergeError
from mergekit_lite.recipe import EnsembleRecipe, Generation, Templates, validate_recipe

runner = CliRunner()
PROMPTS = ["The quick brown fox", "A mixture of experts routes"]
NEW = 8  # max_new_tokens of the pico runs


def quiet(*_):
    pass


class Scripted:
    """A fake member: answers from a script, one entry per call, and keeps every prompt it was given."""

    def __init__(self, script):
        self.script, self.prompts = list(script), []

    def __call__(self, text: str) -> str:
        self.prompts.append(text)
        return self.script[min(len(self.prompts), len(self.script)) - 1]


def tagged(i: int):
    """A fake member that never agrees: its reply in round r is `answer-i-r`."""
    return Scripted([f"answer-{i}-{r}" for r in range(10)])


# --- the round logic --------------------------------------------------------------------------------------------

# written out by hand from the issue, for members 0..3: whom member i sees
TABLE = {
    "memory": [{1, 2, 3}, {0, 2, 3}, {0, 1, 3}, {0, 1, 2}],
    "report": [{1, 2, 3}, {0}, {0}, {0}],
    "relay": [{3}, {0}, {1}, {2}],
    "debate": [{1, 2, 3}, {2, 3}, {1, 3}, {1, 2}],
}


@pytest.mark.parametrize("topology", sorted(TABLE))
def test_visibility_table_by_prompt_content(topology):
    members = [tagged(i) for i in range(4)]
    ex = exchange("Q?", list("abcd"), members, topology=topology, rounds=2)
    assert ex.stopped == "rounds" and len(ex.rounds) == 3
    for r in (1, 2):
        for i, m in enumerate(members):
            prompt = m.prompts[r]
            assert prompt.startswith("Q?") and f"Your previous answer:\nanswer-{i}-{r - 1}" in prompt
            shown = {j for j in range(4) if j != i and f"answer-{j}-{r - 1}" in prompt}
            assert shown == TABLE[topology][i], (topology, r, i, prompt)
            assert not any(f"answer-{j}-{r - 2}" in prompt for j in range(4) if j != i)  # only the last round
            assert ex.rounds[r][i]["prompt"] == prompt
    assert [set(v) for v in visible(topology, 4)] == TABLE[topology]


def test_relay_of_two_and_round_zero_is_the_question_alone():
    a, b = tagged(0), tagged(1)
    exchange("Q?", ["a", "b"], [a, b], topology="relay", rounds=1)
    assert a.prompts[0] == b.prompts[0] == "Q?"
    assert "answer-1-0" in a.prompts[1] and "answer-0-0" in b.prompts[1]


def test_stops_on_agreement_and_after_r_rounds():
    a, b = Scripted(["1", "2", "9"]), Scripted(["3", "2", "9"])
    ex = exchange("Q", ["a", "b"], [a, b], topology="memory", rounds=5)
    assert (ex.stopped, ex.text, len(ex.rounds), len(a.prompts)) == ("agreement", "2", 2, 2)
    same = [Scripted(["7"]), Scripted(["7"]), Scripted(["7"])]
    ex = exchange("Q", list("abc"), same, topology="debate", rounds=3)
    assert (ex.stopped, ex.text, len(ex.rounds)) == ("agreement", "7", 1)
    assert [len(m.prompts) for m in same] == [1, 1, 1]  # nobody asked again
    never = [tagged(0), tagged(1)]
    ex = exchange("Q", ["a", "b"], never, topology="memory", rounds=3)
    assert (ex.stopped, len(ex.rounds), [len(m.prompts) for m in never]) == ("rounds", 4, [4, 4])
    late = [Scripted(["1", "2", "3", "5"]), Scripted(["4", "6", "8", "5"])]  # agree in the last round R
    ex = exchange("Q", ["a", "b"], late, topology="memory", rounds=3)
    assert (ex.stopped, ex.text, len(ex.rounds)) == ("agreement", "5", 4)


def test_confidence_values_and_when_peers_show_them():
    a, b = Scripted(["5", "6", "5", "5"]), Scripted(["7"])
    ex = exchange("Q", ["a", "b"], [a, b], topology="memory", rounds=3)
    assert [m["confidence"] for m in (r[0] for r in ex.rounds)] == pytest.approx([1, 1 / 2, 2 / 3, 3 / 4])
    assert [r[1]["confidence"] for r in ex.rounds] == [1.0] * 4
    assert confidence(["a", "b", "b", "c", "b"]) == pytest.approx(3 / 5)
    # round 1 shows the peers' replies alone; from round 2 on with the confidence after the previous round
    assert b.prompts[1].endswith("Solver 1: 5\n\nConsidering their answers, solve the problem again and give your "
                                 "final answer.")
    assert "confidence" not in b.prompts[1]
    assert "Solver 1 (confidence 0.50): 6" in b.prompts[2] and "Solver 1 (confidence 0.67): 5" in b.prompts[3]
    assert "Solver 2 (confidence 1.00): 7" in a.prompts[2]


@pytest.mark.parametrize("answers,conf,winner", [
    (["x", "y", "y"], [1.0, 0.5, 0.5], 1),               # frequency first, whatever the confidence
    (["x", "y", "x", "y"], [0.5, 0.5, 0.5, 1.0], 3),     # a tie: the higher confidence
    (["x", "y", "x", "y"], [0.5, 0.5, 0.5, 0.5], 0),     # a tie in both: the lower index
    (["y", "x", "x", "y"], [0.5, 0.5, 0.5, 0.5], 0),
    (["a", "b", "c"], [0.5, 0.75, 0.75], 1),
])
def test_final_answer_rule(answers, conf, winner):
    assert final_answer(answers, conf) == winner


def test_final_answer_through_the_rounds():
    # last round x, y, y, x; confidences 2/3, 1/3, 1/3, 1/3: member 0's x (its x came twice) wins the tie
    members = [Scripted(["x", "q", "x"]), Scripted(["a", "b", "y"]), Scripted(["c", "d", "y"]),
               Scripted(["e", "f", "x"])]
    ex = exchange("Q", list("abcd"), members, topology="memory", rounds=2)
    assert ex.stopped == "rounds" and ex.text == "x"
    assert [m["confidence"] for m in ex.rounds[-1]] == pytest.approx([2 / 3, 1 / 3, 1 / 3, 1 / 3])


def test_answer_pattern():
    assert extract("So the answer is 42.", r"answer is (\d+)") == "42"  # first group
    assert extract("x = 17 or 18", r"\d+") == "17"  # no group: the whole (first) match
    assert extract("  no digits here \n", r"\d+") == "no digits here"  # no match: the reply stripped
    assert extract(" 12 \n", None) == "12"
    assert extract("ab", r"(\d+)?b") == "b"  # a group that took no part: the whole match
    assert extract("total:  8 ", r"total:(.*)") == "8"
    a, b = Scripted(["I think 4."]), Scripted(["The result is 4, surely"])
    ex = exchange("Q", ["a", "b"], [a, b], topology="memory", rounds=2, answer_pattern=r"(\d+)")
    assert (ex.stopped, ex.text, [m["answer"] for m in ex.rounds[0]]) == ("agreement", "4", ["4", "4"])
    assert [m["reply"] for m in ex.rounds[0]] == ["I think 4.", "The result is 4, surely"]


def test_templates_are_the_recipes():
    t = Templates(question="Q: {prompt}\nA:", revise="{prompt} | mine: {answer} | {peers}",
                  peer="<{model}={answer}>", peer_confidence="<{model}={answer}@{confidence:.1f}>")
    a, b = Scripted(["1", "2", "3"]), Scripted(["5", "6", "7"])
    exchange("P", ["a", "b"], [a, b], topology="memory", rounds=2, templates=t)
    assert a.prompts == ["Q: P\nA:", "P | mine: 1 | <b=5>", "P | mine: 2 | <b=6@0.5>"]
    f = fuse("P", ["a", "b"], [Scripted(["one "]), Scripted([" two"])], Scripted(["best"]),
             Templates(candidate="[{n}:{model}] {text}", fuse="{candidates} => {prompt}"))
    assert f.fuser_prompt == "[1:a] one\n[2:b] two => P"


def test_fuse_prompt_holds_every_candidate_and_the_reply_is_the_answer():
    writer = Scripted(["  the fused answer \n"])
    f = fuse("What?", ["a", "b", "c"], [Scripted(["alpha"]), Scripted(["beta"]), Scripted(["gamma"])], writer)
    assert f.candidates == [{"model": "a", "text": "alpha"}, {"model": "b", "text": "beta"},
                            {"model": "c", "text": "gamma"}]
    assert f.fuser_prompt == writer.prompts[0]
    assert f.fuser_prompt.startswith("What?") and all(f"Candidate {n}: {t}" in f.fuser_prompt
                                                      for n, t in [(1, "alpha"), (2, "beta"), (3, "gamma")])
    assert f.text == "the fused answer"


# --- prompts through a member's tokenizer ------------------------------------------------------------------------

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_prompt_ids_use_the_chat_template_when_there_is_one(pico_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pico_factory("llama")))
    assert not tok.chat_template
    assert prompt_ids(tok, "fox", None).tolist() == tok("fox", return_tensors="pt").input_ids.tolist()
    assert prompt_ids(tok, "fox", "Be brief.")[0].tolist() == tok("Be brief.\n\nfox").input_ids
    tok.chat_template = CHAT
    want = "<|system|>Be brief.\n<|user|>fox\n<|assistant|>"
    assert tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "fox"}],
                                   add_generation_prompt=True, tokenize=False) == want
    assert prompt_ids(tok, "fox", "Be brief.")[0].tolist() == tok(want, add_special_tokens=False).input_ids
    assert prompt_ids(tok, "fox")[0].tolist() == tok("<|user|>fox\n<|assistant|>", add_special_tokens=False).input_ids


# --- end to end with pico models ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trio(pico_factory):
    """Three pico models with three different vocabularies (and two families)."""
    return (pico_factory("llama"), pico_factory("llama", texts=["completely different words " * 20, "zebra 12 34"]),
            pico_factory("qwen2", seed=2, texts=["A mixture of experts routes every token. " * 8, "digits 0123456789"]))


def write_recipe(tmp_path, models, name="r.yaml", **kw):
    body = {"models": [str(m) if not isinstance(m, dict) else m for m in models], "prompts": PROMPTS,
            "generation": {"max_new_tokens": NEW}, **kw}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def ensemble(path, **kw) -> dict:
    return run_ensemble(path, progress=False, echo=quiet, raw=quiet, **kw)


def greedy(folder, text: str, system: str | None = None, chat: str | None = None) -> str:
    """transformers' own greedy decode of one prompt, with the model's own tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if chat:
        tok.chat_template = chat
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = prompt_ids(tok, text, system)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_members_with_different_vocabularies_exchange(tmp_path, trio):
    from transformers import AutoTokenizer

    from mergekit_lite.ensemble.members import first_difference, id_to_token

    tables = [id_to_token(AutoTokenizer.from_pretrained(str(p))) for p in trio]
    assert first_difference(tables[0], tables[1]) is not None and first_difference(tables[0], tables[2]) is not None
    out = ensemble(write_recipe(tmp_path, trio, method="exchange", exchange={"topology": "relay", "rounds": 2}))
    for prompt, o in zip(PROMPTS, out["outputs"]):
        assert o["stopped"] == "rounds" and len(o["rounds"]) == 3  # these random models never agree
        for i, folder in enumerate(trio):
            assert o["rounds"][0][i]["reply"] == greedy(folder, prompt)  # each decodes with its own tokenizer
            r1 = o["rounds"][1][i]
            assert r1["reply"] == greedy(folder, r1["prompt"])
            assert f"Solver {(i - 1) % 3 + 1}: {o['rounds'][0][(i - 1) % 3]['reply']}" in r1["prompt"]
        last = o["rounds"][-1]
        assert o["text"] == last[final_answer([m["answer"] for m in last], [m["confidence"] for m in last])]["answer"]


def test_identical_members_stop_at_round_zero_and_load_once(tmp_path, trio, monkeypatch):
    import mergekit_lite.verify as verify

    loads = []
    real = verify.load_model
    monkeypatch.setattr(verify, "load_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    out = ensemble(write_recipe(tmp_path, [trio[0], trio[0], trio[0]], method="exchange",
                                exchange={"topology": "debate", "rounds": 3}))
    for prompt, o in zip(PROMPTS, out["outputs"]):
        assert o["stopped"] == "agreement" and len(o["rounds"]) == 1
        assert o["text"] == greedy(trio[0], prompt) == o["rounds"][0][2]["answer"]
        assert [m["confidence"] for m in o["rounds"][0]] == [1.0] * 3
    assert loads == [trio[0]]  # three members, one model in memory


def test_per_member_system_prompt_and_seeds(tmp_path, trio):
    sampled = {"do_sample": True, "temperature": 1.5}
    models = [{"model": str(trio[0]), "system": "Be brief."},
              {"model": str(trio[0]), "generation": {**sampled, "seed": 1}},
              {"model": str(trio[0]), "generation": {**sampled, "seed": 2}}]
    path = write_recipe(tmp_path, models, method="exchange", exchange={"topology": "memory", "rounds": 1})
    out = ensemble(path)
    again = ensemble(path)
    assert out == again  # sampling is seeded: the same recipe gives the same rounds
    first = out["outputs"][0]["rounds"][0]
    assert first[0]["reply"] == greedy(trio[0], PROMPTS[0], system="Be brief.")
    assert first[1]["reply"] != first[2]["reply"]  # two seeds, two samples
    r = validate_recipe(yaml.safe_load(path.read_text()), EnsembleRecipe)
    assert r.member_generation(r.models[1]).model_dump() == {"max_new_tokens": NEW, "do_sample": True,
                                                             "temperature": 1.5, "top_p": 1.0, "seed": 1,
                                                             "stop": []}


def test_stop_strings_end_a_reply(tmp_path, trio, monkeypatch):
    from mergekit_lite.ensemble import decode
    from mergekit_lite.ensemble.speakers import cut

    assert cut("7 apples\nQuestion: more", ["\n"]) == "7 apples"
    assert cut("\n 7\nQ", ["\n"]) == "\n 7"  # leading whitespace never ends a reply
    assert cut("a. b, c", [",", "."]) == "a" and cut("abc", ["x"]) == "abc"
    full = ensemble(write_recipe(tmp_path, trio[:2], "full.yaml", method="exchange",
                                 exchange={"topology": "memory", "rounds": 1}))["outputs"][0]["rounds"][0]
    stop = full[0]["reply"].strip()[2:4]  # two characters inside member 0's first reply
    assert len(stop) == 2 and stop not in full[0]["reply"][:2]
    got = ensemble(write_recipe(tmp_path, trio[:2], "stop.yaml", method="exchange", generation={
        "max_new_tokens": NEW, "stop": [stop]}, exchange={"topology": "memory", "rounds": 1}))["outputs"][0]
    assert got["rounds"][0][0]["reply"] == cut(full[0]["reply"], [stop]).strip()
    assert len(got["rounds"][0][0]["reply"]) < len(full[0]["reply"])
    # decoding ends as soon as the stop string appears: fewer one-token forwards than max_new_tokens - 1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_lite.ensemble.speakers import Speaker

    model = AutoModelForCausalLM.from_pretrained(str(trio[0]), dtype=torch.float32).eval()
    steps = []
    real = decode.forward
    monkeypatch.setattr(decode, "forward", lambda *a: steps.append(a[1].shape[1]) or real(*a))
    speaker = Speaker(model, AutoTokenizer.from_pretrained(str(trio[0])), Generation(max_new_tokens=NEW, stop=[stop]))
    assert speaker.reply(PROMPTS[0]).strip() == got["rounds"][0][0]["reply"]
    assert steps[0] > 1 and 0 < steps.count(1) < NEW - 1


def test_a_members_chat_template_is_used(tmp_path, trio):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = tmp_path / "chat"
    AutoModelForCausalLM.from_pretrained(str(trio[0])).save_pretrained(chat)
    tok = AutoTokenizer.from_pretrained(str(trio[0]))
    tok.chat_template = CHAT
    tok.save_pretrained(chat)
    out = ensemble(write_recipe(tmp_path, [{"model": str(chat), "system": "Be brief."}, trio[1]], method="exchange",
                                exchange={"topology": "memory", "rounds": 1}))
    reply = out["outputs"][0]["rounds"][0][0]["reply"]
    assert reply == greedy(trio[0], PROMPTS[0], system="Be brief.", chat=CHAT)
    assert reply != greedy(trio[0], PROMPTS[0], system="Be brief.")  # the template changed what the model read


def test_fuse_end_to_end(tmp_path, trio):
    out = ensemble(write_recipe(tmp_path, trio[:2], method="fuse", fuser=str(trio[2])))
    for prompt, o in zip(PROMPTS, out["outputs"]):
        assert o["candidates"] == [{"model": str(p), "text": greedy(p, prompt)} for p in trio[:2]]
        assert all(f"Candidate {n}: {c['text']}" in o["fuser_prompt"] for n, c in enumerate(o["candidates"], 1))
        assert o["fuser_prompt"].startswith(prompt)
        assert o["text"] == greedy(trio[2], o["fuser_prompt"])  # the fuser's greedy reply is the answer


def test_json_records_and_text_mode(tmp_path, trio):
    path = write_recipe(tmp_path, trio, method="exchange", exchange={"topology": "report", "rounds": 1})
    result = runner.invoke(app, ["ensemble", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data) == ["outputs"]
    for o in data["outputs"]:
        assert list(o) == ["prompt", "text", "stopped", "rounds"]
        assert all(list(m) == ["model", "prompt", "reply", "answer", "confidence"] for r in o["rounds"] for m in r)
    text = runner.invoke(app, ["ensemble", str(path)])
    assert text.exit_code == 0, text.output
    assert "exchange (report, at most 1 rounds): [0] sees 1, 2; [1] sees 0; [2] sees 0" in text.stdout
    assert "  round 0:" in text.stdout and "  round 1:" in text.stdout and "  stopped: no agreement after 1 rounds" \
        in text.stdout
    o = data["outputs"][0]
    assert f"  answer: {o['text']}" in text.stdout
    assert f"    [1] {trio[1]}: answer {o['rounds'][1][1]['answer']!r} (confidence 0.50)" in text.stdout
    path = write_recipe(tmp_path, trio[:2], "f.yaml", method="fuse", fuser=str(trio[0]))
    result = runner.invoke(app, ["ensemble", str(path), "--json"])
    assert result.exit_code == 0, result.output
    for o in json.loads(result.stdout)["outputs"]:
        assert list(o) == ["prompt", "text", "candidates", "fuser_prompt"]
        assert [list(c) for c in o["candidates"]] == [["model", "text"]] * 2
    text = runner.invoke(app, ["ensemble", str(path)])
    assert "  candidates:" in text.stdout and f"  fuser {trio[0]} wrote the answer from 2 candidates" in text.stdout


# --- refusals ---------------------------------------------------------------------------------------------------

EX = {"method": "exchange", "exchange": {"topology": "memory"}}


@pytest.mark.parametrize("body,expected", [
    ({**EX, "exchange": {"topology": "star"}},
     "exchange.topology = 'star': Input should be 'memory', 'report', 'relay' or 'debate'"),
    ({**EX, "models": ["A"]}, "'exchange' needs at least 2 models"),
    ({"method": "fuse", "fuser": "F", "models": ["A"]}, "'fuse' needs at least 2 models"),
    ({**EX, "exchange": {"topology": "memory", "rounds": 0}}, "exchange.rounds = 0: Input should be greater than"),
    ({**EX, "exchange": {"topology": "memory", "answer_pattern": "(\\d+"}},
     "exchange.answer_pattern = '(\\\\d+': the regular expression does not compile"),
    ({"method": "fuse"}, "method 'fuse' needs `fuser: MODEL`"),
    ({"method": "exchange"}, "method 'exchange' needs `exchange: {topology"),
    ({**EX, "exchange": {"topology": "debate"}}, "topology 'debate' needs at least 3 models"),
    ({"fuser": "F"}, "`fuser:` is read by method 'fuse' only, not 'probs'"),
    ({"exchange": {"topology": "memory"}}, "`exchange:` is read by method 'exchange' only"),
    ({**EX, "weights": [1, 2]}, "'exchange' counts every candidate equally"),
    ({"method": "fuse", "fuser": {"model": "F", "weight": 1}}, "fuser.weight: the fuser writes the answer"),
    ({"models": ["A", {"model": "B", "system": "hi"}]}, "models.1: a member's own `system`/`generation` is read by"),
    ({"method": "vote", "models": ["A", {"model": "B", "generation": {"seed": 1}}]}, "not by 'vote'"),
    ({"templates": {"question": "{prompt}!"}}, "`templates:` is read by exchange and fuse only"),
    ({**EX, "templates": {"peer": "{name}"}}, "templates.peer = '{name}': unknown placeholder {name}"),
    ({**EX, "templates": {"revise": "{prompt}"}}, "templates.revise = '{prompt}': lacks {peers}"),
    ({**EX, "templates": {"fuse": "{prompt} {candidates"}}, "not a valid format string"),
    ({**EX, "models": ["A", {"model": "B", "generation": {"sede": 1}}]}, "unknown key (did you mean 'seed'?)"),
    ({**EX, "exchange": {"topology": "memory", "round": 2}}, "unknown key (did you mean 'rounds'?)"),
    ({"generation": {"stop": ["\n"]}}, "generation.stop is read by exchange and fuse"),
    ({**EX, "generation": {"stop": [""]}}, "an empty stop string"),
])
def test_recipe_refusals(body, expected):
    with pytest.raises(MoemergeError, match=re.escape(expected)):
        validate_recipe({"models": ["A", "B"], **body}, EnsembleRecipe, "r.yaml")


def test_cli_refusals_are_one_line_before_any_weights_load(tmp_path, trio, no_weights_loaded):
    score = tmp_path / "s.txt"
    score.write_text("some text\n")
    cases = [
        ({**EX, "exchange": {"topology": "ring"}}, [], "exchange.topology = 'ring'"),
        ({**EX, "exchange": {"topology": "memory", "rounds": 0}}, [], "exchange.rounds = 0"),
        ({**EX, "exchange": {"topology": "memory", "answer_pattern": "[0-9"}}, [], "does not compile"),
        ({"method": "fuse"}, [], "needs `fuser: MODEL`"),
        ({**EX, "models": [str(trio[0])]}, [], "'exchange' needs at least 2 models"),
        (EX, ["--score", score], "--score needs method probs or logits (exchange picks"),
        ({"method": "fuse", "fuser": str(tmp_path / "nowhere")}, [], "model folder not found"),
    ]
    for k, (body, extra, expected) in enumerate(cases):
        body = {"models": [str(p) for p in trio[:2]], **body}
        path = write_recipe(tmp_path, body.pop("models"), f"c{k}.yaml", **body)
        result = runner.invoke(app, ["ensemble", str(path), *map(str, extra)])
        assert isinstance(result.exception, MoemergeError), (body, result.output)
        msg = str(result.exception)
        assert expected in msg, (expected, msg)
        lines = msg.splitlines()
        assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("invalid recipe")), lines
