"""Step-0 parity: compare an output model's logits with its source's on sample text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_lite.errors import MoemergeError, first_line
from mergekit_lite.pico import SAMPLE_TEXT


@dataclass
class ParityReport:
    """How far a model's logits are from a reference's on the same tokens."""
    max_abs: float
    mean_abs: float
    top1_agreement: float
    n_tokens: int
    dtype: str
    device: str

    def lines(self) -> list[str]:
        """The report as `moemerge verify` prints it."""
        return [f"parity over {self.n_tokens} tokens ({self.dtype}, {self.device}):",
                f"  max |Δlogits|  {self.max_abs:.3e}",
                f"  mean |Δlogits| {self.mean_abs:.3e}",
                f"  top-1 agreement {100 * self.top1_agreement:.2f}%"]


def default_device() -> torch.device:
    """The device accelerate would pick for this process (a GPU when one is visible)."""
    from accelerate import PartialState

    return PartialState().device


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device, gguf_file: str | None = None,
               trust_remote_code: bool = False):
    """A causal LM from a model folder (or from the GGUF file `gguf_file` inside `path`), in eval mode on `device`;
    foreign custom code in a folder only with `trust_remote_code`."""
    from mergekit_lite.io.reader import refuse_leaving_links
    from mergekit_lite.models import load_causal_lm, trust_for

    if gguf_file is None:
        refuse_leaving_links(path, "verify")  # transformers would follow a link anywhere
        trust_for(path, trust_remote_code, "load")  # foreign custom code refused before transformers reads it
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model = load_causal_lm(path, trust_remote_code=trust_remote_code and gguf_file is None, dtype=dtype, **extra)
    except Exception as e:  # noqa: BLE001 - report any load failure as a one-line user error
        where = Path(path) / gguf_file if gguf_file else path
        raise MoemergeError(f"transformers cannot load {where}: {type(e).__name__}: {first_line(e)}") from None
    return model.to(device).eval()


def sample_ids(model_dir: Path, reference: Path, text: str, vocab_size: int) -> torch.Tensor:
    """Token ids of `text` with the output's (or the reference's) tokenizer; seeded ids without one."""
    from transformers import AutoTokenizer

    for folder in (model_dir, reference):
        try:
            tok = AutoTokenizer.from_pretrained(str(folder))
        except Exception:  # noqa: BLE001 - no usable tokenizer here; try the next folder
            continue
        ids = tok(text, return_tensors="pt").input_ids
        if ids.numel() > 1 and int(ids.max()) < vocab_size:
            return ids
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (1, 64), generator=g)


def recorded_sources(model_dir: str | Path) -> list[str]:
    """The inputs of the step that made `model_dir` (its sidecar's last lineage step), as recorded."""
    from mergekit_lite.io.sidefiles import read_sidecar

    lineage = (read_sidecar(model_dir) or {}).get("lineage") or []
    return [str(s) for s in lineage[-1].get("sources", [])] if lineage else []


def is_recorded_source(model_dir: str | Path, reference: str | Path) -> bool:
    """Whether `reference` is a recorded input of the folder (same folder once links are resolved, or same id)."""
    ref = Path(reference).expanduser()
    for src in recorded_sources(model_dir):
        if str(reference) == src or (ref.exists() and Path(src).exists() and ref.resolve() == Path(src).resolve()):
            return True
    return False


def record_parity(model_dir: str | Path, reference: str | Path, report: ParityReport) -> bool:
    """Store the parity figures in the folder's sidecar and model card; False when it has no sidecar."""
    from mergekit_lite.card import write_card
    from mergekit_lite.io.sidefiles import read_sidecar, write_sidecar

    record = read_sidecar(model_dir)
    if record is None:
        return False
    record["parity"] = {"max_abs": report.max_abs, "mean_abs": report.mean_abs,
                        "top1_agreement": report.top1_agreement, "tokens": report.n_tokens,
                        "dtype": report.dtype, "against": str(reference)}
    write_sidecar(model_dir, record)
    from mergekit_lite.io.reader import read_config

    config = read_config(model_dir)
    write_card(model_dir, record, config)
    return True


@torch.no_grad()
def compare_logits(model_dir: str | Path, reference: str | Path, *, text: str = SAMPLE_TEXT,
                   dtype: str = "float32", device: str | None = None,
                   trust_remote_code: bool = False) -> ParityReport:
    """Run both models on the same tokens and compare the logits position by position."""
    from mergekit_lite.ops.router_init import check_device

    check_device(device)  # one line before loading anything, not torch's assertion after the first model
    dev = torch.device(device) if device else default_device()
    tdtype = getattr(torch, dtype)
    ref = load_model(reference, tdtype, dev, trust_remote_code=trust_remote_code)
    ids = sample_ids(Path(model_dir), Path(reference), text, ref.config.get_text_config().vocab_size).to(dev)
    ref_logits = ref(ids).logits.float()
    del ref
    out = load_model(model_dir, tdtype, dev, trust_remote_code=trust_remote_code)
    out_logits = out(ids).logits.float()
    if out_logits.shape != ref_logits.shape:
        raise MoemergeError(f"logit shapes differ: {tuple(out_logits.shape)} vs reference {tuple(ref_logits.shape)} "
                            "(different vocabularies?)")
    diff = (out_logits - ref_logits).abs()
    top1 = (out_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    return ParityReport(diff.max().item(), diff.mean().item(), top1, ids.shape[1], dtype, str(dev))
