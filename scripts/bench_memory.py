"""Peak anonymous memory per process of `moemerge train`: one process against 2 FSDP2 processes (CPU, gloo).

Builds a dense Llama-shaped fp32 model (about 268M parameters by default), then trains it for 3 steps with
one checkpoint (step 2) and the final save, once as one process and once under recipes/accelerate/fsdp.yaml
with 2 processes, while a thread polls `/proc/PID/status` (RssAnon) of every training process every 20 ms.
Load, training, the checkpoint and the final save are all inside the measured window. Prints each rank's peak
and its ratio to the one-process peak (the two runs side by side in one invocation, on one machine).

    python scripts/bench_memory.py                 # ~268M parameters (hidden 1024, 16 layers, FFN 4096)
    python scripts/bench_memory.py --layers 4      # a quicker, smaller check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FSDP = ROOT / "recipes" / "accelerate" / "fsdp.yaml"


def training_pids(root_pid: int) -> dict[int, int]:
    """{pid: rank} of the training processes under `root_pid` (itself when it trains alone: rank 0)."""
    found: dict[int, int] = {}
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        stack += [int(c) for c in children]
        rank = next((int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")), None)
        if b"mergekit_lite" in cmd and b"accelerate" not in cmd and (rank is not None or pid == root_pid):
            found[pid] = rank or 0
    return found


def rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_per_rank(cmd: list[str], env: dict[str, str], timeout: float = 1800) -> dict[int, int]:
    """Run `cmd`; the peak RssAnon in bytes of each training process, by rank. Raises with the output tail
    when the command fails."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peaks: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid, rank in training_pids(proc.pid).items():
                try:
                    peaks[rank] = max(peaks.get(rank, 0), rss_anon(pid))
                except OSError:
                    pass
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate(timeout=timeout)
    done.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-4000:]}")
    return peaks


def build(folder: Path, hidden: int, layers: int, ffn: int) -> Path:
    """A dense Llama of the given shape (fp32, random weights, the pico tokenizer), saved once."""
    from mergekit_lite.pico import build_pico_model
    from mergekit_lite.train.corpus import stdlib_docstrings

    if not (folder / "config.json").exists():
        build_pico_model("llama", folder, texts=stdlib_docstrings(), hidden_size=hidden, intermediate_size=ffn,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=256)
    return folder


def compare(model: Path, root: Path, steps: int = 3) -> dict:
    """Train `model` on one process and on 2 FSDP2 processes; {"one": bytes, "fsdp2": {rank: bytes}}."""
    from mergekit_lite.train.corpus import write_corpus

    train_txt, val_txt = write_corpus(root / "corpus")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    result = {}
    for name, launcher in (("one", [sys.executable, "-m", "mergekit_lite"]),
                           ("fsdp2", [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                                      "--main_process_port", "0", "--config_file", str(FSDP), "-m", "mergekit_lite"])):
        recipe = root / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({
            "model": str(model), "data": {"train": [str(train_txt)], "validation": [str(val_txt)]}, "seq_len": 32,
            "micro_batch_size": 2, "global_batch_size": 4, "max_steps": steps, "learning_rate": 1e-4,
            "eval_batches": 1, "checkpoint_every": 2, "output": str(root / name)}))
        peaks = peak_per_rank([*launcher, "train", str(recipe)], env)
        result[name] = peaks[0] if name == "one" else peaks
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--keep", type=Path, help="folder to build the model and runs in (kept); default a temp dir")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        model = build(root / "dense", args.hidden, args.layers, args.ffn)
        cfg = json.loads((model / "config.json").read_text())
        from safetensors import safe_open

        with safe_open(str(model / "model.safetensors"), "pt") as f:
            n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        print(f"model: llama hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, FFN "
              f"{cfg['intermediate_size']}: {n / 1e6:.0f}M parameters, {4 * n / 1e9:.2f} GB in fp32")
        res = compare(model, root)
        one = res["one"]
        print(f"one process        peak RssAnon {one / 1e9:.2f} GB")
        for rank, peak in sorted(res["fsdp2"].items()):
            print(f"FSDP2 rank {rank} of 2  peak RssAnon {peak / 1e9:.2f} GB  = {peak / one:.2f} x one process")


if __name__ == "__main__":
    main()
