"""Tokenising + packing throughput of `moemerge train`'s cached data path: 1 process against N workers.

Builds a corpus of English (the standard library's docstrings, repeated to --mb megabytes), a BPE tokenizer
trained on it (the pico models' tokenizer), then packs the corpus with `data.num_proc: 1` and `data.num_proc: N`
side by side in one run, each into a fresh cache (after `datasets` has made its Arrow copy of the text file once,
untimed), and prints tokens/s and the ratio.

    python scripts/bench_tokenise.py                 # 40 MB, N = the usable cores
    python scripts/bench_tokenise.py --mb 10 --workers 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    import datasets

    from mergekit_lite.pico import build_tokenizer
    from mergekit_lite.recipe import TrainRecipe, validate_recipe
    from mergekit_lite.threads import usable_cores
    from mergekit_lite.train.corpus import stdlib_docstrings
    from mergekit_lite.train.data import load_texts, packed_dataset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=40.0, help="corpus size in megabytes")
    ap.add_argument("--workers", type=int, default=usable_cores())
    args = ap.parse_args()
    docs = stdlib_docstrings()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text = "\n".join(d.replace("\n", " ") for d in docs) + "\n"
        reps = max(1, int(args.mb * 1e6 / len(text.encode())))
        (root / "corpus.txt").write_text(text * reps)
        tok = build_tokenizer(docs)
        tok.save_pretrained(str(root / "tok"))
        print(f"corpus: {(root / 'corpus.txt').stat().st_size / 1e6:.1f} MB, {len(docs) * reps} documents")
        warm = validate_recipe({"model": str(root / "tok"), "data": {"train": [str(root / "corpus.txt")]},
                                "seq_len": 512, "micro_batch_size": 1, "max_steps": 1, "learning_rate": 1e-3,
                                "output": str(root / "run")}, TrainRecipe)
        load_texts(warm.data.train, "train", warm.data, streaming=False)  # datasets' Arrow copy: built once, not timed
        datasets.disable_caching()  # else the second run reads the first one's tokenised rows from datasets' cache
        rates = {}
        for n in (1, args.workers):
            r = validate_recipe({"model": str(root / "tok"), "data": {"train": [str(root / "corpus.txt")],
                                                                      "num_proc": n},
                                 "seq_len": 512, "micro_batch_size": 1, "max_steps": 1, "learning_rate": 1e-3,
                                 "output": str(root / "run")}, TrainRecipe)
            t0 = time.perf_counter()
            ds = packed_dataset(r.data.train, "train", r.data, tok, root / "tok", 512, root / f"cache-{n}", True,
                                lambda: None)
            seconds = time.perf_counter() - t0
            rates[n] = len(ds) * 512 / seconds
            print(f"num_proc {n}: {len(ds) * 512 / 1e6:.1f}M tokens in {seconds:.1f} s = {rates[n] / 1e3:.0f}k tokens/s")
        print(f"ratio {args.workers} workers / 1: {rates[args.workers] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
