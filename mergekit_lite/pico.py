"""Pico models built on the fly: real Hugging Face checkpoints of every family, small enough for tests.

Nothing is downloaded. The tests, `moemerge quickstart` and the benchmarks all build their inputs
here, so there is one definition of "a small Llama/Qwen/Gemma checkpoint".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few "
    "feed-forward networks chosen by a small router, so the model grows in capacity while the compute "
    "per token stays almost the same. Sparse upcycling starts those experts from a trained dense model."
)

PICO_DIMS: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
)


def build_tokenizer(texts: list[str], vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers (bos/eos/pad/unk set)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def pico_config(family: str, vocab_size: int, **overrides: Any):
    """A transformers config of `family` (llama, mistral, qwen2, qwen3, gemma3_text, or an MoE type)."""
    from transformers import AutoConfig

    dims = dict(PICO_DIMS, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if family in ("qwen3", "gemma3_text", "qwen3_moe"):
        dims["head_dim"] = dims["hidden_size"] // dims["num_attention_heads"]
    if family == "gemma3_text":
        n = overrides.get("num_hidden_layers", dims["num_hidden_layers"])
        dims.update(sliding_window=16, query_pre_attn_scalar=16,
                    layer_types=["full_attention" if (j + 1) % 3 == 0 else "sliding_attention" for j in range(n)])
    dims.update(overrides)
    return AutoConfig.for_model(family, **dims)


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Weights large enough that every tensor matters to the logits (HF's 0.02 init is nearly linear)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if "norm" in name and p.dim() == 1:
                p.copy_((1.0 if p.abs().sum() > 0 else 0.0) + noise)
            else:
                p.copy_(noise)


def build_pico_model(family: str, out_dir: str | Path, *, tied: bool = False, dtype: torch.dtype = torch.float32,
                     max_shard_size: str | None = None, seed: int = 0, texts: list[str] | None = None,
                     **config_overrides: Any) -> Path:
    """Save a randomly initialised `family` model with a trained BPE tokenizer into `out_dir`."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tok = build_tokenizer(texts or [SAMPLE_TEXT] * 4)
    cfg = pico_config(family, len(tok), tie_word_embeddings=tied, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    _randomize(model, seed)
    model.to(dtype)
    model.config.dtype = dtype
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    tok.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    return out_dir
