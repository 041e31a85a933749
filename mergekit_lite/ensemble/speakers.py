"""A member that answers in text: its own tokenizer, chat template, system prompt and decoding settings.

`exchange` and `fuse` only ever see `Speaker.reply(text, index) -> str`, so members may differ in tokenizer and
vocabulary (each decodes alone, its logits cut to its own tokenizer's size).
"""

from __future__ import annotations

import torch

from mergekit_lite.ensemble.decode import eos_ids, generate
from mergekit_lite.recipe import Generation


def prompt_ids(tokenizer, user: str, system: str | None = None) -> torch.Tensor:
    """[1, T] token ids of one user turn: through the tokenizer's chat template when it has one.

    With a chat template, the system prompt (if any) and the user text become messages and the template adds
    the generation prompt (and its own special tokens). Without one, the system prompt and a blank line go
    before the text, tokenised as a plain prompt.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    text = f"{system}\n\n{user}" if system else user
    return tokenizer(text, return_tensors="pt").input_ids


class Speaker:
    """One member (or the fuser) answering texts alone; replies are kept, so asking again costs nothing.

    Args:
        model: a loaded causal LM (possibly shared with other speakers).
        tokenizer: the model's own tokenizer.
        generation: decoding settings; with sampling, prompt `index` draws from `seed + index`. A reply ends
            before the first `stop` string after its leading whitespace (decoding stops as soon as one appears).
        system: the system prompt, or None.
    """

    def __init__(self, model, tokenizer, generation: Generation, system: str | None = None):
        self.model, self.tokenizer, self.generation, self.system = model, tokenizer, generation, system
        self.eos = eos_ids(tokenizer, model)
        self._said: dict[tuple[str, int], str] = {}

    def reply(self, text: str, index: int = 0) -> str:
        """The decoded reply to `text` (special tokens dropped), for the `index`-th prompt of a run."""
        key = (text, index)
        if key not in self._said:  # greedy, or sampled from a fixed seed: the same question gets the same reply
            ids = prompt_ids(self.tokenizer, text, self.system).to(self.model.device)
            rng = torch.Generator().manual_seed(self.generation.seed + index)
            tokens, _, _ = generate([self.model], ids, method="probs", weights=[1.0], vocab=len(self.tokenizer),
                                    generation=self.generation, eos=self.eos, generator=rng,
                                    until=self._stopped if self.generation.stop else None)
            self._said[key] = cut(self.tokenizer.decode(tokens, skip_special_tokens=True), self.generation.stop)
        return self._said[key]

    def _stopped(self, tokens: list[int]) -> bool:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return cut(text, self.generation.stop) != text


def cut(text: str, stop: list[str]) -> str:
    """`text` up to (not including) the earliest `stop` string after its leading whitespace (a reply that opens
    with a newline is not cut to nothing by a newline stop string)."""
    start = len(text) - len(text.lstrip())
    ends = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return text[:min(ends)] if ends else text
