"""Text-level ensembles: Exchange-of-Thought rounds and a fuser model, as pure functions of `reply` callables.

Nothing here touches a model: each member is a callable `reply(text) -> str` (a loaded model with its own
tokenizer and chat template in `speakers`, a scripted fake in the tests), so the round logic — who sees whom,
confidence, when to stop, which answer wins — is tested on its own.

Exchange-of-Thought (Yin et al., EMNLP 2023): round 0, every member answers alone; in round r = 1..R each
member gets the question, its own previous reply and the round r-1 replies of the members its topology lets
it see (with their confidences from round 2 on), and answers again. The exchange stops when every member
gives the same answer, else after R rounds.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mergekit_lite.recipe import Templates

Reply = Callable[[str], str]


def visible(topology: str, n: int) -> list[list[int]]:
    """Who each of members 0..n-1 sees in a round: `visible(t, n)[i]` lists the members i reads.

    memory: every other member; report: member 0 sees every other member, each other member sees only
    member 0; relay: member i sees member i-1 (mod n); debate: member 0 sees every other member, the others
    see each other but not member 0.
    """
    others = [[j for j in range(n) if j != i] for i in range(n)]
    if topology == "memory":
        return others
    if topology == "report":
        return [others[0]] + [[0] for _ in range(1, n)]
    if topology == "relay":
        return [[(i - 1) % n] for i in range(n)]
    if topology == "debate":
        return [others[0]] + [[j for j in others[i] if j != 0] for i in range(1, n)]
    raise ValueError(f"unknown topology {topology!r}")


def extract(reply: str, pattern: str | None) -> str:
    """The answer in a reply: the first group of `pattern`'s first match, else the whole match, else the reply.

    Every result is stripped of surrounding whitespace; a pattern that does not match gives the whole reply.
    """
    if pattern is not None:
        found = re.search(pattern, reply)
        if found is not None:
            group = found.group(1) if found.re.groups and found.group(1) is not None else found.group(0)
            return group.strip()
    return reply.strip()


def confidence(history: Sequence[str]) -> float:
    """A member's confidence after round r: how often its most common answer came in rounds 0..r, over r + 1."""
    return Counter(history).most_common(1)[0][1] / len(history)


def final_answer(answers: Sequence[str], confidences: Sequence[float]) -> int:
    """The member whose last-round answer wins: most frequent answer; ties to higher confidence, then lower index.

    Returns:
        The index of that member (its answer is the ensemble's).
    """
    count = Counter(answers)
    return max(range(len(answers)), key=lambda i: (count[answers[i]], confidences[i], -i))


@dataclass
class ExchangeResult:
    """One prompt's exchange: the final answer, why it stopped, and every round's records."""

    prompt: str
    text: str
    stopped: str  # "agreement" or "rounds"
    rounds: list[list[dict]] = field(default_factory=list)  # [round][member] {model, prompt, reply, answer, confidence}

    def as_json(self) -> dict:
        """The `--json` record: exactly prompt, text, stopped, rounds."""
        return {"prompt": self.prompt, "text": self.text, "stopped": self.stopped, "rounds": self.rounds}


def peers_text(seen: list[int], last: list[dict], templates: Templates, with_confidence: bool) -> str:
    """The lines of `{peers}`: one per seen member, from its previous-round record."""
    line = templates.peer_confidence if with_confidence else templates.peer
    return "\n".join(line.format(n=j + 1, model=last[j]["model"], reply=last[j]["reply"], answer=last[j]["answer"],
                                 confidence=last[j]["confidence"]) for j in seen)


def exchange(prompt: str, names: Sequence[str], replies: Sequence[Reply], *, topology: str, rounds: int,
             answer_pattern: str | None = None, templates: Templates | None = None) -> ExchangeResult:
    """Run Exchange-of-Thought rounds for one prompt.

    Args:
        prompt: the question.
        names: one name per member (recorded as `model`).
        replies: one callable per member: the member's reply to a text.
        topology: memory, report, relay or debate (see `visible`).
        rounds: R >= 1, the most rounds after round 0.
        answer_pattern: a regex that finds the answer in a reply (see `extract`).
        templates: the prompt texts (the recipe's `templates`).

    Returns:
        The final answer (the agreed one, else `final_answer` of the last round), `stopped` and every round.
    """
    templates = templates or Templates()
    seen = visible(topology, len(replies))
    history: list[list[str]] = [[] for _ in replies]  # each member's answers, round by round

    def record(i: int, text: str) -> dict:
        reply = replies[i](text).strip()
        answer = extract(reply, answer_pattern)
        history[i].append(answer)
        return {"model": names[i], "prompt": text, "reply": reply, "answer": answer,
                "confidence": confidence(history[i])}

    question = templates.question.format(prompt=prompt)
    log = [[record(i, question) for i in range(len(replies))]]
    for r in range(1, rounds + 1):
        if len({m["answer"] for m in log[-1]}) == 1:
            break
        last = log[-1]
        log.append([record(i, templates.revise.format(
            prompt=prompt, reply=last[i]["reply"], answer=last[i]["answer"],
            peers=peers_text(seen[i], last, templates, with_confidence=r >= 2))) for i in range(len(replies))])
    agreed = len({m["answer"] for m in log[-1]}) == 1
    best = final_answer([m["answer"] for m in log[-1]], [m["confidence"] for m in log[-1]])
    return ExchangeResult(prompt, log[-1][best]["answer"], "agreement" if agreed else "rounds", log)


@dataclass
class FuseResult:
    """One prompt's fusion: every member's candidate, the fuser's prompt and its reply (the answer)."""

    prompt: str
    text: str
    candidates: list[dict]  # [{model, text}]
    fuser_prompt: str

    def as_json(self) -> dict:
        """The `--json` record: exactly prompt, text, candidates, fuser_prompt."""
        return {"prompt": self.prompt, "text": self.text, "candidates": self.candidates,
                "fuser_prompt": self.fuser_prompt}


def fuse(prompt: str, names: Sequence[str], replies: Sequence[Reply], fuser: Reply,
         templates: Templates | None = None) -> FuseResult:
    """Members answer alone; the fuser reads the question and every candidate and writes the final answer."""
    templates = templates or Templates()
    question = templates.question.format(prompt=prompt)
    candidates = [{"model": n, "text": reply(question).strip()} for n, reply in zip(names, replies)]
    lines = "\n".join(templates.candidate.format(n=j + 1, model=c["model"], text=c["text"])
                      for j, c in enumerate(candidates))
    fuser_prompt = templates.fuse.format(prompt=prompt, candidates=lines)
    return FuseResult(prompt, fuser(fuser_prompt).strip(), candidates, fuser_prompt)
