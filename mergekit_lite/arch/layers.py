"""Per-layer config fields: read them as one value per layer, and rewrite them when layers move.

A graft stacks layers taken from anywhere, so every config field that describes layers by
index must follow its layer. Each field is first read as an explicit per-layer list through
transformers' own config class (so defaults such as Gemma3's 5-sliding/1-full pattern or
Qwen-MoE's `decoder_sparse_step` count), then rebuilt for the output's layer order:

  layer_types         one entry per layer, taken from the layer's source
  MoE layers          written by the MoE family's dense-layer scheme (arch/specs.py) from the layers that
                      held experts in their source: `mlp_only_layers` (with `decoder_sparse_step` set to 1,
                      since a step pattern does not survive layers moving), `first_k_dense_replace`, or
                      ERNIE's start/end/interval
  max_window_layers   transformers 5 only uses it to seed a default `layer_types`; the explicit
                      `layer_types` written beside it is what the model runs. It is kept as the
                      number of leading output layers that lay below the source's boundary.
"""

from __future__ import annotations

from typing import Any

from mergekit_lite.arch.tables import DENSE, MOE, model_type_of, moe_counts

# Fields that differ between checkpoints of one architecture without changing any tensor's meaning.
_IGNORED = {"architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache",
            "num_hidden_layers", "layer_types", "max_window_layers", "mlp_only_layers", "decoder_sparse_step"}

Origin = tuple[int, int]  # (source model index, source layer index) of one output layer


def per_layer_fields(model_type: str) -> tuple[str, ...]:
    """The config fields of a family that hold one entry per layer or refer to layer indices."""
    fam = DENSE.get(model_type) or MOE.get(model_type)
    return fam.per_layer_fields if fam else ()


def hf_config(cfg: dict[str, Any]):
    """transformers' own config for `cfg`, so that defaults computed from other fields are applied."""
    from transformers import AutoConfig

    from mergekit_lite.models import register_own_config

    register_own_config()
    body = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    return AutoConfig.for_model(model_type_of(cfg), **body)


def nests_text_config(cfg: dict[str, Any]) -> bool:
    """The project's own classes: the dense config under `text_config`, MoE fields beside it."""
    fam = MOE.get(model_type_of(cfg))
    return bool(fam and fam.nests_text_config and isinstance(cfg.get("text_config"), dict))


def layer_views(cfg: dict[str, Any]) -> dict[str, list]:
    """Each per-layer field of the dense decoder in `cfg` as one value per layer.

    Returns `layer_types` -> attention kind, `max_window_layers` -> True below the boundary. Fields the
    family lacks are absent. A nested config (moemerge) gives its dense part's views. Which layers hold
    experts is `moe_layers_of`.
    """
    if nests_text_config(cfg):
        return layer_views(cfg["text_config"])
    fields = per_layer_fields(model_type_of(cfg))
    obj = hf_config(cfg)
    n = cfg["num_hidden_layers"]
    views: dict[str, list] = {}
    if "layer_types" in fields and getattr(obj, "layer_types", None) is not None:
        views["layer_types"] = list(obj.layer_types)
    if "max_window_layers" in fields and getattr(obj, "max_window_layers", None) is not None:
        views["max_window_layers"] = [i < obj.max_window_layers for i in range(n)]
    return views


def moe_layers_of(cfg: dict[str, Any]) -> list[int] | None:
    """The layers of a MoE config that hold experts, read by its family's dense-layer scheme with the class's
    defaults applied (Qwen-MoE's `decoder_sparse_step`, glm4_moe's `first_k_dense_replace: 1`); None for a dense
    config, [] for a MoE config without experts."""
    fam = MOE.get(model_type_of(cfg))
    if fam is None:
        return None
    n = (cfg["text_config"] if nests_text_config(cfg) else cfg)["num_hidden_layers"]
    full = hf_config(cfg).to_dict()
    if moe_counts(full)[0] is None:  # no experts: every layer runs the dense FFN
        return []
    return fam.dense_layers.decode(full, n)


def remap_layers(configs: list[dict[str, Any]], origin: list[Origin]) -> dict[str, Any]:
    """The config of a model whose layer o is layer `origin[o][1]` of model `origin[o][0]`.

    Everything but the per-layer fields comes from the first output layer's model. A nested config (moemerge)
    has its dense part remapped by the dense family's rules. Which layers hold experts is written by the MoE
    family's dense-layer scheme; a layout it cannot express is left out (graft refuses it, naming the layers).
    """
    first = configs[origin[0][0]]
    if nests_text_config(first):
        base = dict(first)
        base["text_config"] = _remap_dense([c["text_config"] for c in configs], origin)
    else:
        base = _remap_dense(configs, origin)
    fam = MOE.get(model_type_of(first))
    if fam is not None and fam.dense_layers.any_dense:
        moe = [set(moe_layers_of(c) or []) for c in configs]
        fields = fam.dense_layers.encode([o for o, (m, i) in enumerate(origin) if i in moe[m]], len(origin))
        base.update(fields or {})
    return base


def _remap_dense(configs: list[dict[str, Any]], origin: list[Origin]) -> dict[str, Any]:
    """`remap_layers` for the decoder's own per-layer fields (attention kinds, sliding-window boundary)."""
    base = dict(configs[origin[0][0]])
    views = [layer_views(c) for c in configs]
    out_n = len(origin)
    base["num_hidden_layers"] = out_n
    picked = {name: [views[m][name][i] for m, i in origin] for name in views[origin[0][0]]}
    if "layer_types" in picked:
        base["layer_types"] = picked["layer_types"]
    if "max_window_layers" in picked:
        below = picked["max_window_layers"]
        lead = next((o for o, b in enumerate(below) if not b), out_n)
        base["max_window_layers"] = max(out_n, base.get("max_window_layers", 0)) if lead == out_n else lead
    return base


def config_mismatch(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """Name the first config field two models disagree on (layer-count fields aside), or None."""
    for key in sorted(set(a) | set(b)):
        if key in _IGNORED:
            continue
        if key == "text_config" and isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            if (diff := config_mismatch(a[key], b[key])) is not None:
                return f"text_config: {diff}"
            continue
        if a.get(key) != b.get(key):
            return f"config field {key!r}: {a.get(key)!r} vs {b.get(key)!r}"
    return None
