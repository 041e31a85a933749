"""The project's own model classes (`architecture: moemerge`) and how every command loads model folders.

A moemerge folder carries Hugging Face custom code (configuration_moemerge.py, modeling_moemerge.py and
an `auto_map` in config.json), so users load it with `trust_remote_code=True` and no mergekit-lite.
Inside this project a folder's custom code is never executed from the folder: when its code files are
byte-identical to the ones this version ships (`code_status` == "own"), the classes are imported from
this package and registered with transformers' Auto classes; any other custom code ("foreign": an
edited file, another project's model) is loaded only when the user said `trust_remote_code: true`
(recipe field or CLI flag), and refused otherwise with a one-line error naming that switch.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from mergekit_lite.errors import MoemergeError

MODEL_TYPE = "moemerge"
_PKG = Path(__file__).parent / "moemerge"
# file name in the output folder -> file of this package (byte-identical)
CODE_FILES = ("configuration_moemerge.py", "modeling_moemerge.py")
AUTO_MAP = {"AutoConfig": "configuration_moemerge.MoemergeConfig",
            "AutoModelForCausalLM": "modeling_moemerge.MoemergeForCausalLM"}
ARCHITECTURE = "MoemergeForCausalLM"
# The code files earlier versions of this package wrote (sha256 of each), whose folders this version's classes load
# as they are (those versions had the top-k block only, which is unchanged): after an upgrade such a folder is
# still "own", not foreign code to be trusted by hand. tests/data/ keeps the files themselves.
EARLIER_CODE = (
    {"configuration_moemerge.py": "eef50c0740f238e3ae55bd3edd9a1b48c794a34f8d8dff9e52bcd40b7c6f3a0a",
     "modeling_moemerge.py": "39a22d9819020bd0c5923665c070f06571aa992e87dd1889bcb6437af15530cb"},  # aaf35c6
)


def code_files() -> dict[str, bytes]:
    """The custom-code files an output folder gets, as this version ships them."""
    return {name: (_PKG / name).read_bytes() for name in CODE_FILES}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def code_status(folder: str | Path) -> str:
    """"none" (no custom code: plain transformers), "own" (moemerge files this version or an earlier one wrote,
    unchanged; `EARLIER_CODE`) or "foreign".

    transformers runs a folder's code only through config.json's `auto_map`, so a folder without one is "none"
    (other `.py` files in it never run). It is "own" only when the config names our model type and our
    auto_map and both files it points to are byte-identical to this package's (they import nothing else);
    any other auto_map, or an edited file, is foreign.
    """
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "none"
    auto_map = cfg.get("auto_map") if isinstance(cfg, dict) else None
    if not auto_map:
        return "none"
    if cfg.get("model_type") != MODEL_TYPE or auto_map != AUTO_MAP:
        return "foreign"
    have = {n: _digest((folder / n).read_bytes()) for n in CODE_FILES if (folder / n).is_file()}
    ours = {n: _digest(data) for n, data in code_files().items()}
    return "own" if any(have == known for known in (ours, *EARLIER_CODE)) else "foreign"


@lru_cache(maxsize=1)
def register_own_config() -> None:
    """Make `AutoConfig` build moemerge configs from this package: all that config validation needs, without
    importing the modeling code (and with it transformers' model machinery, a second of start-up)."""
    from transformers import AutoConfig

    from mergekit_lite.models.moemerge.configuration_moemerge import MoemergeConfig

    AutoConfig.register(MODEL_TYPE, MoemergeConfig, exist_ok=True)


@lru_cache(maxsize=1)
def register_own_classes() -> None:
    """Make transformers' Auto classes build moemerge models from this package (no code from any folder)."""
    from transformers import AutoModelForCausalLM

    from mergekit_lite.models.moemerge.configuration_moemerge import MoemergeConfig
    from mergekit_lite.models.moemerge.modeling_moemerge import MoemergeForCausalLM

    register_own_config()
    AutoModelForCausalLM.register(MoemergeConfig, MoemergeForCausalLM, exist_ok=True)


def trust_for(folder: str | Path, trust_remote_code: bool, where: str) -> bool:
    """The `trust_remote_code` to pass to transformers for `folder`; refuses foreign code not trusted.

    Own code is loaded through this package (False: transformers never imports the folder's files).
    """
    register_own_classes()
    status = code_status(folder)
    if status != "foreign":
        return False
    if not trust_remote_code:
        raise MoemergeError(f"{where}: {folder} holds custom code that is not this version's moemerge code (an edited "
                            "or foreign configuration/modeling .py file); moemerge runs it only when you set "
                            "trust_remote_code: true (recipe) or pass --trust-remote-code, after reading it")
    return True


def _folder_class(folder: str | Path, auto_name: str):
    """The class the folder's own `auto_map` names for `auto_name`, imported from the folder's files (trusted).

    transformers prefers a registered class to a folder's code even when trusted; a trusted edited moemerge
    folder must run its own files, so its classes are imported here.
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    ref = (json.loads((Path(folder) / "config.json").read_text()).get("auto_map") or {}).get(auto_name)
    return get_class_from_dynamic_module(ref, str(folder)) if isinstance(ref, str) else None


def load_config(folder: str | Path, *, trust_remote_code: bool = False, where: str = "load", **kwargs: Any):
    """`AutoConfig.from_pretrained` with the rules above."""
    from transformers import AutoConfig

    trust = trust_for(folder, trust_remote_code, where)
    cls = _folder_class(folder, "AutoConfig") if trust else None
    if cls is not None:
        return cls.from_pretrained(str(folder), **kwargs)
    return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust, **kwargs)


def load_causal_lm(folder: str | Path, *, trust_remote_code: bool = False, where: str = "load", **kwargs: Any):
    """`AutoModelForCausalLM.from_pretrained` with the rules above (kwargs: dtype, attn_implementation ...)."""
    from transformers import AutoModelForCausalLM

    trust = trust_for(folder, trust_remote_code, where)
    cls = _folder_class(folder, "AutoModelForCausalLM") if trust else None
    if cls is not None:
        return cls.from_pretrained(str(folder), **kwargs)
    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=trust, **kwargs)


def is_moemerge(config: dict[str, Any]) -> bool:
    """Whether a config.json dict describes a moemerge model."""
    return isinstance(config, dict) and config.get("model_type") == MODEL_TYPE


def text_part(config: dict[str, Any]) -> dict[str, Any]:
    """The dense decoder's fields of a config.json dict, with the MoE fields of a moemerge config on top.

    Tools that read sizes (layers, hidden size, vocabulary, positions) see one flat dict for every folder.
    """
    if is_moemerge(config):
        return {**(config.get("text_config") or {}), **{k: v for k, v in config.items() if k != "text_config"}}
    return config.get("text_config") or config
