"""`moemerge train` recipes: continued pretraining with accelerate."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from mergekit_lite.errors import MoemergeError
from mergekit_lite.recipe.base import ByteSize, DType, Strict


def _one_or_many(value):
    """`train: corpus.txt` as well as `train: [corpus.txt]`."""
    return [value] if isinstance(value, str) else value


def _known_encoding(name: str) -> str:
    import codecs

    try:
        return codecs.lookup(name).name
    except LookupError:
        raise ValueError(f"unknown text encoding {name!r}; e.g. utf-8, latin-1, cp1252") from None


def _weighted_entries(data):
    """`train:` entries may be `{path: ..., weight: ...}` mappings (Megatron's blend): split into `train` (paths)
    and `weights` (plain entries weigh 1)."""
    if isinstance(data, dict) and isinstance(data.get("train"), list) and any(isinstance(e, dict)
                                                                             for e in data["train"]):
        if data.get("weights") is not None:
            raise ValueError("give weights either on the train entries or as data.weights, not both")
        entries = data["train"]
        bad = [e for e in entries if isinstance(e, dict) and set(e) - {"path", "weight"} or
               isinstance(e, dict) and "path" not in e]
        if bad:
            raise ValueError(f"a weighted train entry is {{path: FILE, weight: SHARE}}, got {bad[0]!r}")
        data = {**data, "train": [e["path"] if isinstance(e, dict) else e for e in entries],
                "weights": [float(e.get("weight", 1.0)) if isinstance(e, dict) else 1.0 for e in entries]}
    return data


class TrainData(Strict):
    """Where the training text comes from (local files through the `datasets` library, or a Hub dataset)."""

    train: Annotated[list[str], BeforeValidator(_one_or_many)] = Field(
        min_length=1, description="files, folders or globs (.txt, .jsonl, .json, .parquet), or a Hub dataset name "
                                  "when online")
    weights: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="sampling share of each train entry (normalised): blocks are drawn from the entries in "
                          "these proportions, each entry packed (or streamed) on its own; or give {path, weight} "
                          "entries")
    config: str | None = Field(None, description="dataset repositories (a Hub id, or a downloaded snapshot folder "
                               "whose README.md declares configs): the config/subset, e.g. sample-10BT")
    split: str = Field("train", description="dataset repositories: the split `train` reads")
    validation_split: str = Field("validation", description="dataset repositories: the split `validation` reads")
    revision: str | None = Field(None, description="dataset repositories on the Hub: a branch, tag or commit; pin "
                                 "one, since the tokenisation cache is keyed by it, not by the Hub's content")
    validation: Annotated[list[str] | None, BeforeValidator(_one_or_many)] = Field(
        None, description="held-out files; default: a split of `train`")
    validation_fraction: float = Field(0.05, gt=0, lt=0.5,
                                       description="share of documents held out (split before packing)")
    text_field: str = Field("text", description="column holding the text in .jsonl/.parquet")
    encoding: Annotated[str, AfterValidator(_known_encoding)] = Field(
        "utf-8", description="text encoding of .txt/.jsonl/.json files (e.g. latin-1)")
    streaming: bool = Field(False, description="stream corpora larger than memory (no tokenisation cache)")
    shuffle_buffer: int = Field(1024, ge=0, description="streaming: training blocks drawn from a seeded buffer of "
                                "this many (0 or 1: the stream's order); cached corpora are shuffled whole")
    num_proc: int | None = Field(None, ge=1, description="processes tokenising a cached corpus (default: the usable "
                                 "cores, at most one per 1000 documents)")
    wait_minutes: float = Field(60, gt=0, le=7 * 24 * 60, description="with several processes: how long the others "
                                "wait for the main one to tokenise and pack the corpus before giving up")
    validation_blocks: int = Field(64, ge=1, description="with streaming and no `validation`: the first N blocks "
                                   "(their documents are left out of training)")

    @model_validator(mode="before")
    @classmethod
    def _split_weights(cls, data):
        return _weighted_entries(data)

    @model_validator(mode="after")
    def _weights_fit(self) -> "TrainData":
        if self.weights is not None and len(self.weights) != len(self.train):
            raise ValueError(f"data.weights has {len(self.weights)} values for {len(self.train)} train entries; "
                             "give one per entry")
        return self


class MoETraining(Strict):
    """Router losses and balancing for MoE models (ignored for dense models)."""

    balance_coef: float = Field(0.01, ge=0, description="Switch/GShard load-balancing loss coefficient")
    z_coef: float = Field(0.001, ge=0, description="router z-loss coefficient (ST-MoE)")
    bias_update_rate: float = Field(0.0, ge=0, description="auxiliary-loss-free balancing (DeepSeek-V3): "
                                                           "per-expert selection bias step; 0 = off")
    jitter: float = Field(0.0, ge=0, lt=1, description="multiplicative router-input noise in [1-j, 1+j] (Switch)")
    routing: Literal["topk", "noisy_topk", "switch", "gshard"] = Field(
        "topk", description="training-time routing: topk (the saved class's own), noisy_topk (Shazeer), "
                            "switch (top-1, raw probability), gshard (top-2, random second expert); "
                            "validation and the saved model always route plain top-k")
    train_top_k: int | None = Field(None, ge=1, description="experts per token while training; default the "
                                    "model's; required (1) for switch on a top-k>1 model, (2) for gshard off top-2")
    capacity_factor: float | None = Field(None, gt=0, description="expert capacity C: each expert takes at most "
                                          "ceil(C * tokens * k / E) assignments per micro-batch; none = no dropping")
    drop_policy: Literal["position", "probs"] = Field("position", description="over capacity, drop the latest "
                                                      "tokens (position) or the lowest weights (probs)")

    @model_validator(mode="after")
    def _policy_k(self) -> "MoETraining":
        need = {"switch": 1, "gshard": 2}.get(self.routing)
        if need and self.train_top_k not in (None, need):
            raise ValueError(f"routing = {self.routing!r} routes top-{need}, but train_top_k = {self.train_top_k}; "
                             f"set train_top_k: {need} or leave it out")
        return self


class LoraSettings(Strict):
    """LoRA adapters (peft), merged into the weights when the model is saved."""

    r: int = Field(16, ge=1)
    """adapter rank"""
    alpha: int = Field(32, ge=1)
    """LoRA scaling: the update is multiplied by alpha / r"""
    dropout: float = Field(0.0, ge=0, lt=1)
    """dropout on the adapter's input (refused on expert parameters: peft cannot apply it there)"""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """module names to adapt; on MoE models gate_proj/up_proj/down_proj (w1/w3/w2) reach the fused expert tensors"""


class TrainRecipe(Strict):
    """`moemerge train`: continued pretraining with accelerate."""

    model: str = Field(description="HF model folder (or Hub id when online)")
    revision: str | None = None
    """Hub revision when `model` is a Hub id"""
    data: TrainData
    """where the training text comes from (the data.* fields)"""
    seq_len: int = Field(ge=8)
    """tokens per packed block (at most the model's max_position_embeddings)"""
    micro_batch_size: int = Field(ge=1)
    """blocks per process per micro-step"""
    gradient_accumulation_steps: int | None = Field(None, ge=1, description="micro-batches per optimizer step "
                                                    "on each process (default 1); or give global_batch_size")
    global_batch_size: int | None = Field(None, ge=1, description="sequences per optimizer step over all processes; "
                                          "accumulation = global_batch_size / (micro_batch_size x processes), so "
                                          "the run is the same on any process count")
    max_steps: int | None = Field(None, ge=1)
    """optimizer steps; give this or max_tokens"""
    max_tokens: int | None = Field(None, ge=1, description="alternative to max_steps")
    learning_rate: float = Field(gt=0)
    """peak AdamW learning rate, reached after warmup"""
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to learning_rate * min_lr_ratio")
    warmup_steps: int = Field(0, ge=0)
    """linear warmup from 0: step s (from 0) uses s / warmup_steps of learning_rate"""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay (none on norms and biases)"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping; 0 = off")
    # YAML 1.1 reads an unquoted `no` as false: the documented default must still be accepted as written.
    # None: bf16 on a GPU that supports it, fp32 ("no") elsewhere (engine.default_precision)
    mixed_precision: Annotated[Literal["no", "bf16", "fp16"] | None,
                               BeforeValidator(lambda v: "no" if v is False else v)] = None
    """no, bf16 or fp16; default bf16 on a GPU that supports it, else no (the run header says which ran)"""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="attention kernel: sdpa (torch's, default), eager, flash_attention_2 (needs flash-attn)")
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    compile: bool = Field(False, description="torch.compile each decoder layer in place (one compilation reused by "
                          "every layer; parameter names, checkpoints and the saved model unchanged); the first steps "
                          "are slower while it compiles")
    seed: int = 0
    """fixes the batch order and every random draw of the run"""
    trainable: Literal["all", "routers", "routers+experts", "new_layers", "added", "lora"] = "all"
    """all, routers, routers+experts, new_layers (the identity blocks of graft --expand), added (what the upcycle
    created: PEER / MH-MoE blocks and routers; every source tensor stays bit-identical) or lora"""
    lora: LoraSettings = LoraSettings()
    """LoRA adapters for trainable: lora (the lora.* fields)"""
    moe: MoETraining = MoETraining()
    """router losses, balancing and training-time routing (the moe.* fields; ignored for dense models)"""
    trust_remote_code: bool = Field(False, description="run custom code in the model folder that is not this "
                                    "version's own moemerge code (read it first); own moemerge folders need nothing")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = none")
    keep_checkpoints: int = Field(2, ge=1)
    """checkpoints kept; older ones are removed"""
    eval_every: int = Field(0, ge=0, description="steps between validations; 0 = only at the end")
    eval_batches: int = Field(16, ge=1, description="validation batches per evaluation (cap)")
    log_every: int = Field(1, ge=1)
    """optimizer steps between metrics lines"""
    tracker: Literal["none", "tensorboard", "mlflow", "wandb"] = "none"
    """none, tensorboard, mlflow or wandb through accelerate's trackers (metrics.jsonl is always written)"""
    output: str
    """run folder (checkpoints/, metrics.jsonl, final/); -o/--output wins"""
    save_dtype: DType = Field("source", description="dtype of the final model: source = the model's own")
    shard_size: ByteSize = "5GB"
    """shard cap of final/, as for upcycle"""
    workers: int | None = Field(None, ge=1, description="writer threads (default: from the cores and the output disk)")

    @model_validator(mode="after")
    def _length(self) -> "TrainRecipe":
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("give exactly one of max_steps or max_tokens")
        if self.gradient_accumulation_steps is not None and self.global_batch_size is not None:
            raise ValueError("give one of gradient_accumulation_steps or global_batch_size, not both")
        if self.global_batch_size is not None and self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size = {self.global_batch_size} is not a multiple of micro_batch_size = "
                             f"{self.micro_batch_size}")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be smaller than max_steps={self.max_steps}")
        if self.moe.routing == "noisy_topk" and self.trainable == "lora":
            raise ValueError("moe.routing = 'noisy_topk' with trainable = 'lora': peft would freeze the new noise "
                             "weights (W_noise), so the noise could never be learned; use trainable: all or "
                             "routers, or another moe.routing")
        return self

    def accumulation(self, processes: int) -> int:
        """Micro-batches per optimizer step on each of `processes` processes; a global batch that does not
        divide is a user error (one line, with the nearest sizes that do)."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps or 1
        per = self.micro_batch_size * processes
        if self.global_batch_size % per:
            lo, hi = (self.global_batch_size // per) * per, (self.global_batch_size // per + 1) * per
            raise MoemergeError(f"global_batch_size = {self.global_batch_size} is not a multiple of micro_batch_size "
                                f"x processes = {self.micro_batch_size} x {processes} = {per}; set it to "
                                f"{' or '.join(str(v) for v in (lo, hi) if v)}, or change micro_batch_size")
        return self.global_batch_size // per

    def global_batch(self, processes: int) -> int:
        """Sequences per optimizer step over all processes."""
        return self.accumulation(processes) * self.micro_batch_size * processes
