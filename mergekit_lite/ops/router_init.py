"""Prompt-based router initialisation (`router.init: hidden`, as mergekit-moe's hidden-state gates).

For every expert copy, the base model is run over that expert's prompts and the hidden state *at the
router's input* is averaged: the output of each layer's `post_attention_layernorm`, which is exactly
what the MoE block's router sees (not the residual stream). The router row of copy c in layer i is
normalise(mean_pos[c, i] - mean_neg[c, i]): a token whose FFN input looks like expert c's prompts
scores highest on expert c. Without negative prompts the row is the normalised positive mean
(centring on the average of all experts was tried: it routed no better on our checks). Prompts
stream through the model one batch at a time; only per-layer running sums of shape (H,) are kept,
so memory does not grow with the number of prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mergekit_lite.errors import MoemergeError, first_line

if TYPE_CHECKING:
    from mergekit_lite.plan import Plan
    from mergekit_lite.recipe import UpcycleRecipe


def check_device(device: str | None, flag: str = "--device") -> None:
    """Refuse a device this torch cannot run on, in one line, before any plan is printed or byte read.

    Args:
        device: what the user passed (None: accelerate's choice later, always runnable).
        flag: how the user wrote the option, for the message.
    """
    if not device:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise MoemergeError(f"{flag} {device!r} is not a device; use cpu, cuda, cuda:1, mps ... "
                            "or leave it out for accelerate's choice") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise MoemergeError(f"{flag} {device}: this torch {torch.__version__} was built without CUDA; "
                                "use --device cpu, leave it out, or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if count == 0 or (dev.index or 0) >= count:
            raise MoemergeError(f"{flag} {device}: {count} CUDA device(s) visible here; use --device cpu"
                                + (f" or cuda:0..cuda:{count - 1}" if count else ""))
    elif dev.type not in ("cpu", "meta"):
        backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if available is not None and not available():
            raise MoemergeError(f"{flag} {device}: no {dev.type} device is available here; use --device cpu")


def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    from accelerate import PartialState  # accelerate picks the visible GPU (or MPS) when there is one

    return PartialState().device


def load_base(model_dir: str | Path, device: torch.device):
    """The dense base model in eval mode (fp32 on CPU, the checkpoint's own dtype on an accelerator)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if device.type == "cpu" else "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()  # type: ignore[arg-type]  # transformers types `.to` as its own decorator
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - any load failure is a one-line user error
        raise MoemergeError(f"router.init=hidden cannot load the base model {model_dir}: "
                            f"{type(e).__name__}: {first_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # causal attention: real tokens never see right padding
    return model, tok


@torch.no_grad()
def mean_ffn_inputs(model, tok, prompts: list[str], layers: list[int], *, batch_size: int,
                    max_length: int) -> dict[int, torch.Tensor]:
    """Mean over all prompt tokens of each layer's FFN input (post-attention norm output): {layer: (H,)}."""
    decoder = model.get_decoder()
    dev = next(model.parameters()).device
    hidden = model.config.get_text_config().hidden_size
    sums = {i: torch.zeros(hidden, dtype=torch.float32, device=dev) for i in layers}
    state: dict[str, torch.Tensor] = {}

    def hook(i: int):
        def add(_module, _inputs, out):
            mask = state["mask"].unsqueeze(-1).to(torch.float32)  # (B, T, 1)
            sums[i] += (out.float() * mask).sum(dim=(0, 1))      # (B, T, H) -> (H,)
        return add

    handles = [decoder.layers[i].post_attention_layernorm.register_forward_hook(hook(i)) for i in layers]
    n_tokens = 0
    try:
        for b in range(0, len(prompts), batch_size):
            enc = tok(prompts[b:b + batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length).to(dev)
            state["mask"] = enc["attention_mask"]
            decoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
            n_tokens += int(enc["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()
    if n_tokens == 0:
        raise MoemergeError("router.init=hidden: the prompts tokenise to no tokens; give non-empty prompts")
    return {i: s / n_tokens for i, s in sums.items()}


def prompt_router_rows(model_dir: str | Path, positives: list[list[str]], negatives: list[list[str]],
                       layers: list[int], *, device: str | None = None, batch_size: int = 8,
                       max_length: int = 512) -> dict[int, torch.Tensor]:
    """Router rows {layer: (copies, H)} on the CPU, one unit-norm row per expert copy."""
    dev = _device(device)
    model, tok = load_base(model_dir, dev)
    kw = dict(batch_size=batch_size, max_length=max_length)
    pos = [mean_ffn_inputs(model, tok, p, layers, **kw) for p in positives]
    neg = [mean_ffn_inputs(model, tok, n, layers, **kw) if n else None for n in negatives]
    rows = {}
    for i in layers:
        r = torch.stack([p[i] - (n[i] if n else 0) for p, n in zip(pos, neg)])  # (copies, H)
        rows[i] = torch.nn.functional.normalize(r, dim=-1).cpu()
    del model
    return rows


def fill_prompt_router(plan: "Plan", recipe: "UpcycleRecipe", device: str | None, echo=print) -> None:
    """`router.init: hidden`: run the base model over each copy's prompts and put the rows into the plan."""
    ops = [op for op in plan.ops if op.fn == "router_rows"]
    if not ops:
        return
    if recipe.experts:
        pos = [e.prompts or [] for e in recipe.experts]
        neg = [e.negative_prompts or [] for e in recipe.experts]
    else:
        pos, neg = recipe.router.prompts, recipe.router.negative_prompts or [[] for _ in recipe.router.prompts]
    echo(f"  router: mean hidden states of {sum(map(len, pos))} prompts ({sum(map(len, neg))} negative)")
    rows = prompt_router_rows(plan.sources[0], pos, neg, [op.args["layer"] for op in ops], device=device,
                              batch_size=recipe.router.batch_size, max_length=recipe.router.max_length)
    for op in ops:
        op.args["rows"] = rows[op.args["layer"]]
