"""Config translation: a dense config.json into the config of a native MoE class."""

from __future__ import annotations

from typing import Any

from mergekit_lite.arch.tables import COMMON_FIELDS, MoEFamily
from mergekit_lite.errors import MoemergeError

# Fields that describe the file, not the model: never carried, never reported as dropped.
_META = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path"}


def moe_config(dense: dict[str, Any], fam: MoEFamily, *, num_experts: int, top_k: int,
               expert_size: int, dtype: str, overrides: dict[str, Any] | None = None) -> tuple[dict, list[str]]:
    """Build the MoE config; returns (config, dense fields that do not apply to the target).

    Everything the source had that the target understands is kept (rope parameters and scaling,
    positions, tied embeddings, sliding window, token ids, attention bias ...); the MoE fields are set.
    """
    if fam.nests_text_config:
        return _nested_config(dense, fam, num_experts=num_experts, top_k=top_k, expert_size=expert_size,
                              dtype=dtype, overrides=overrides), []
    keep = set(COMMON_FIELDS) | set(fam.carry_fields)
    cfg = {k: v for k, v in dense.items() if k in keep}
    dropped = sorted(k for k in dense if k not in keep and k not in _META)
    if fam.expert_size_field != "intermediate_size":
        cfg["intermediate_size"] = dense["intermediate_size"]  # dense layers (mlp_only_layers) keep this size
    cfg.update(fam.fixed_fields)
    cfg.update({
        "architectures": [fam.architecture], "model_type": fam.model_type, "dtype": dtype,
        fam.experts_field: num_experts, "num_experts_per_tok": top_k, fam.expert_size_field: expert_size,
    })
    if "sliding_window" in dense and fam.model_type == "qwen2_moe" and dense.get("model_type") == "mistral":
        # Mistral slides on every layer when sliding_window is set; Qwen2-MoE spells that per layer.
        if dense.get("sliding_window"):
            n = dense["num_hidden_layers"]
            cfg.update(use_sliding_window=True, max_window_layers=0, layer_types=["sliding_attention"] * n)
    cfg.update(overrides or {})
    validate_config(cfg)
    return cfg, dropped


def _nested_config(dense: dict[str, Any], fam: MoEFamily, *, num_experts: int, top_k: int, expert_size: int,
                   dtype: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The project's own classes: the dense config whole under `text_config`, the MoE fields beside it."""
    text = {k: v for k, v in dense.items() if k not in _META or k == "model_type"}
    text["dtype"] = dtype
    cfg = {"architectures": [fam.architecture], "model_type": fam.model_type, "dtype": dtype, "text_config": text,
           "tie_word_embeddings": bool(_tied(dense)), **fam.fixed_fields,
           fam.experts_field: num_experts, "num_experts_per_tok": top_k, fam.expert_size_field: expert_size}
    cfg.update(overrides or {})
    validate_config(cfg)
    return cfg


def _tied(dense: dict[str, Any]) -> bool:
    """Whether the dense model ties lm_head to the embeddings, defaults included (Gemma3's is True)."""
    from mergekit_lite.arch.layers import hf_config

    return bool(hf_config(dense).tie_word_embeddings)


def validate_config(cfg: dict[str, Any]) -> None:
    """Let transformers' own config class reject values it cannot use."""
    from transformers import AutoConfig

    from mergekit_lite.models import register_own_config

    register_own_config()

    body = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    try:
        AutoConfig.for_model(cfg["model_type"], **body)
    except Exception as e:  # noqa: BLE001 - any config failure is a user-facing incompatibility
        raise MoemergeError(f"transformers rejects the {cfg['model_type']} config this recipe produces: {e}") from None
