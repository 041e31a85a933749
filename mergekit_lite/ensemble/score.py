"""`moemerge ensemble --score FILE`: mean next-token cross-entropy of each member and of the ensemble.

The text is packed exactly as `train` packs it (`train.data.packed_dataset`: documents joined with EOS,
cut into `score.seq_len` blocks), so the figures compare with a train run's validation loss.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from mergekit_lite.ensemble.combine import combine, normalise, perplexity_weights, prefix_mean_nll
from mergekit_lite.errors import MoemergeError
from mergekit_lite.recipe import EnsembleRecipe, TrainData


def packed_blocks(file: Path, recipe: EnsembleRecipe, tokenizer, tokenizer_dir: Path) -> torch.Tensor:
    """[N, seq_len] token ids of `file`, packed as `train` packs its data."""
    from mergekit_lite.train.data import packed_dataset

    cfg = TrainData(train=[str(file)], text_field=recipe.score.text_field)
    with tempfile.TemporaryDirectory(prefix="moemerge-score-") as cache:
        try:
            ds = packed_dataset([str(file)], "score", cfg, tokenizer, tokenizer_dir, recipe.score.seq_len,
                                Path(cache), True)
        except MoemergeError as e:  # its messages name a train recipe's fields; say what this command reads
            raise MoemergeError(str(e).replace("data.score", f"--score {file}")
                                .replace("lower seq_len", "lower score.seq_len")) from None
        return torch.stack([row["input_ids"] for row in ds])


@torch.no_grad()
def token_nll(models: list, ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of every member [M, B, T-1] and their logits [M, B, T-1, V] for a batch ids [B, T]."""
    logits = torch.stack([m(input_ids=ids.to(m.device)).logits[:, :-1, :vocab].float().to(ids.device)
                          for m in models])
    target = ids[:, 1:]
    nll = torch.stack([F.cross_entropy(lg.transpose(1, 2), target, reduction="none") for lg in logits])
    return nll, logits


def ensemble_nll(logits: torch.Tensor, nll: torch.Tensor, target: torch.Tensor, recipe: EnsembleRecipe
                 ) -> torch.Tensor:
    """The ensemble's per-token NLL [B, T-1]; perplexity weights at a position come from the tokens before it."""
    if recipe.weights == "perplexity":
        w = perplexity_weights(prefix_mean_nll(nll), recipe.temperature_ppl)  # [M, B, T-1]
    else:
        w = normalise(recipe.fixed_weights() or [1.0] * logits.shape[0])  # [M]
    out = []
    for b in range(logits.shape[1]):  # one row at a time: M x T x V floats, not M x B x T x V
        wb = w[:, b] if w.dim() > 1 else w
        logp = combine(logits[:, b], wb, recipe.method)  # [T-1, V]
        out.append(-logp.gather(-1, target[b, :, None])[:, 0])
    return torch.stack(out)


def score_file(file: Path, recipe: EnsembleRecipe, names: list[str], models: list, tokenizer, tokenizer_dir: Path,
               vocab: int, progress: bool = True) -> dict:
    """Mean next-token cross-entropy (nats/token) of each member and of the ensemble on `file`.

    Returns:
        {"members": [{"model", "loss"}], "ensemble": {"loss"}, "blocks": N, "tokens": scored tokens}.
    """
    from tqdm.auto import tqdm

    blocks = packed_blocks(file, recipe, tokenizer, tokenizer_dir)
    bs = recipe.score.batch_size
    member_sum = torch.zeros(len(models), dtype=torch.float64)
    ens_sum, count = torch.zeros((), dtype=torch.float64), 0
    for start in tqdm(range(0, len(blocks), bs), desc="score", unit="batch", file=sys.stderr, disable=not progress):
        ids = blocks[start:start + bs].to(models[0].device)  # the maths stays on the models' device
        nll, logits = token_nll(models, ids, vocab)
        member_sum += nll.double().sum(dim=(1, 2)).cpu()
        ens_sum += ensemble_nll(logits, nll, ids[:, 1:], recipe).double().sum().cpu()
        count += nll[0].numel()
    return {"members": [{"model": n, "loss": (s / count).item()} for n, s in zip(names, member_sum)],
            "ensemble": {"loss": (ens_sum / count).item()}, "blocks": len(blocks), "tokens": count}
