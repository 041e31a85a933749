"""Training data: text files through `datasets`, tokenised, joined with EOS and packed into blocks.

Map-style (default): the packed blocks are saved once under `OUTPUT/cache/packed-<part>-<hash>` (the
hash covers the files' names, sizes and mtimes, the tokenizer, `seq_len` and the held-out split), so a
resumed run does not tokenise again. Streaming (`data.streaming: true`, `train/stream.py`): blocks are packed on
the fly from an `IterableDataset`, for corpora larger than memory.

Without `data.validation`, the held-out text is split off by *document* before packing (a block
joins several documents, so a split of blocks would put one document on both sides).
"""

from __future__ import annotations

import glob
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.errors import MoemergeError, first_line
from mergekit_lite.recipe import TrainData

COUNTS = "moemerge-counts.json"  # beside a packed cache: the corpus's tokens, and those kept in blocks
PACKING = 2  # in the cache key: caches packed by another rule are not reused (1: each 1000-document batch alone)
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def resolve_files(specs: list[str], field: str) -> tuple[str, list[str]] | None:
    """Expand files, folders and globs; returns (datasets builder, files), or None for a Hub dataset name."""
    files: list[str] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir() and is_dataset_repo(p):
            if len(specs) > 1:
                raise MoemergeError(f"data.{field}: {spec!r} is a dataset repository (its README.md declares "
                                    "configs); give it as an entry of its own with a weight, not in a list of files")
            return None
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.suffix in BUILDERS and f.is_file())
        elif any(ch in spec for ch in "*?["):
            found = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).suffix in BUILDERS)
        elif p.is_file():
            found = [str(p)]
        elif len(specs) == 1 and spec.count("/") == 1 and not p.suffix:
            return None  # looks like a Hub dataset id ("org/name")
        else:
            raise MoemergeError(f"data.{field}: {spec!r} is not a file, folder or matching glob; check the path")
        if not found:
            raise MoemergeError(f"data.{field}: {spec!r} holds no .txt, .jsonl, .json or .parquet files")
        files += found
    kinds = {BUILDERS[Path(f).suffix] for f in files}
    if len(kinds) > 1:
        raise MoemergeError(f"data.{field}: mixes file kinds {sorted(kinds)}; use one kind per list")
    return kinds.pop(), files


def is_dataset_repo(folder: Path) -> bool:
    """A folder laid out as a Hub dataset repository (a downloaded snapshot): the YAML header of its README.md
    declares `configs` or `dataset_info`. `datasets` loads it by config and split, as it loads the Hub's."""
    import yaml

    card = folder / "README.md"
    if not card.is_file():
        return False
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return False
    try:
        header = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:
        return False
    return isinstance(header, dict) and bool({"configs", "dataset_info"} & set(header))


def hub_options(cfg: TrainData, field: str) -> dict[str, Any]:
    """`datasets.load_dataset` options for a dataset repository (Hub id or local snapshot): config, split, revision."""
    split = cfg.split if field == "train" else cfg.validation_split
    return {"name": cfg.config, "split": split, "revision": cfg.revision}


def check_repo_options(cfg: TrainData) -> None:
    """config/split/revision given for a corpus of plain files would be ignored without a word: refused."""
    given = [k for k, default in (("config", None), ("split", "train"), ("revision", None))
             if getattr(cfg, k) != default]
    entries = [*cfg.train, *(cfg.validation or [])]
    if given and all(resolve_files([spec], "train") is not None for spec in entries):
        raise MoemergeError(f"data.{given[0]} applies to dataset repositories (a Hub id, or a folder whose README.md "
                            "declares configs), and data names only files; remove it")


def load_texts(specs: list[str], field: str, cfg: TrainData, streaming: bool):
    """A `datasets` dataset with one text column named `text`."""
    import datasets

    resolved = resolve_files(specs, field)
    try:
        if resolved is None:
            ds = datasets.load_dataset(specs[0], streaming=streaming, **hub_options(cfg, field))
        else:
            builder, files = resolved
            extra = {"encoding": cfg.encoding} if builder in ("text", "json") else {}
            ds = datasets.load_dataset(builder, data_files={"train": files}, split="train", streaming=streaming,
                                       **extra)
    except Exception as e:  # noqa: BLE001 - any loading failure is a data problem the user must fix
        raise MoemergeError(_load_failure(field, specs, resolved, cfg, e)) from None
    columns = ds.column_names
    if columns is None:  # a stream whose builder was given options (encoding) knows its columns at the first row
        columns = list(next(iter(ds), {}).keys())
    if cfg.text_field not in columns:
        raise MoemergeError(f"data.{field}: no column {cfg.text_field!r} (columns: {columns}); set data.text_field")
    return ds


def _load_failure(field: str, specs: list[str], resolved, cfg: TrainData, e: BaseException) -> str:
    """One line for a failed load: `datasets` wraps the real cause (a decoding error) in its own, without the file."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, UnicodeDecodeError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, UnicodeDecodeError) and resolved is not None:
        bad = next((f for f in resolved[1] if not _decodes(f, cfg.encoding)), resolved[1][0])
        return (f"data.{field}: {bad} is not {cfg.encoding} text ({cause.reason} at byte {cause.start}); set "
                f"data.encoding to the file's encoding (e.g. latin-1, cp1252) or convert it to {cfg.encoding}")
    reason = f"{type(e).__name__}: {first_line(e)}"
    if resolved is None:  # a dataset repository: name what was asked of it, and how to work offline
        opts = ", ".join(f"{k} {v!r}" for k, v in hub_options(cfg, field).items() if v is not None)
        hint = "check data.config, data.split / data.validation_split and data.revision against the dataset's"
        if not Path(specs[0]).expanduser().is_dir():
            hint += (f"; offline, download it first (hf download --repo-type dataset {specs[0]} --local-dir DIR) "
                     "and give DIR")
        return f"data.{field}: cannot load dataset {specs[0]!r} ({opts}): {reason[:300]}; {hint}"
    return f"data.{field}: cannot load {specs}: {reason}"


def _decodes(path: str, encoding: str) -> bool:
    import codecs

    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def text_column(batch_texts: list, field: str, text_field: str) -> list[str]:
    """The documents of a batch: strings that are not blank; a value that is not text is one line."""
    bad = next((t for t in batch_texts if t is not None and not isinstance(t, str)), None)
    if bad is not None:
        raise MoemergeError(f"data.{field}: column {text_field!r} holds a {type(bad).__name__} ({str(bad)[:40]!r}), "
                            "not text; point data.text_field at the column that holds the documents")
    return [t for t in batch_texts if t and t.strip()]  # blank lines are not documents


def pack_ids(docs: list[list[int]], eos: int, seq_len: int, carry: list[int]) -> tuple[list[list[int]], list[int]]:
    """Join documents with EOS and cut into `seq_len` blocks; returns (blocks, leftover tokens)."""
    buf = list(carry)
    for ids in docs:
        buf += ids + [eos]
    n = len(buf) // seq_len
    return [buf[i * seq_len:(i + 1) * seq_len] for i in range(n)], buf[n * seq_len:]


def _fingerprint(specs: list[str], tokenizer_dir: Path, seq_len: int, field: str, split: str = "") -> str:
    h = hashlib.sha256(f"{PACKING}:{seq_len}:{field}:{split}".encode())
    resolved = resolve_files(specs, "train")
    repo = [Path(specs[0]).expanduser()] if resolved is None else []
    repo_files = sorted(str(f) for f in repo[0].rglob("*") if f.is_file()) if repo and repo[0].is_dir() else []
    for f in resolved[1] if resolved else repo_files or specs:
        st = Path(f).stat() if Path(f).exists() else None
        h.update(f"{Path(f).resolve()}:{st.st_size if st else ''}:{st.st_mtime_ns if st else ''}".encode())
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt"):
        if (tokenizer_dir / name).is_file():
            h.update(hashlib.sha256((tokenizer_dir / name).read_bytes()).digest())
    return h.hexdigest()[:16]


def split_documents(ds, part: str, fraction: float, seed: int):
    """One side of a seeded split of the rows (documents): `validation` holds `fraction` of them, `train` the rest."""
    try:
        split = ds.train_test_split(test_size=fraction, seed=seed, shuffle=True)
    except ValueError as e:  # too few documents for either side to hold one
        raise MoemergeError(f"data.validation_fraction = {fraction}: cannot hold out documents of data.train "
                            f"({len(ds)} documents: {e}); add documents or give data.validation files") from None
    return split["test" if part == "validation" else "train"]


def packed_dataset(specs: list[str], field: str, cfg: TrainData, tokenizer, tokenizer_dir: Path, seq_len: int,
                   cache_dir: Path, is_main: bool, on_main=None, *, part: str | None = None, seed: int = 0) -> Any:
    """Tokenised and packed blocks ({"input_ids": [seq_len]}), cached on disk; the main process builds it.

    `part` ("train" or "validation") keeps one side of `split_documents` (by `cfg.validation_fraction`
    and `seed`) before packing; each side is cached under its own name and hash. `on_main(what, fn)` runs
    `fn` on the main process first and on the others once it succeeded (`engine.main_builds`).
    """
    split = f"{part}:{cfg.validation_fraction}:{seed}" if part else ""
    options = f"{cfg.text_field}:{cfg.encoding}:{sorted(hub_options(cfg, field).items())}"
    key = _fingerprint(specs, tokenizer_dir, seq_len, options, split)
    path = cache_dir / f"packed-{part or field}-{key}"

    def build():
        if is_main and not (path / "dataset_info.json").exists():
            _pack_to(path, specs, field, cfg, tokenizer, seq_len, part, seed)
        return _load_packed(path, field, cfg, seq_len, part)

    what = f"tokenise and pack data.{field}{f' ({part} side)' if part else ''} into {path}"
    return on_main(what, build) if on_main else build()


def _pack_to(path: Path, specs: list[str], field: str, cfg: TrainData, tokenizer, seq_len: int, part: str | None,
             seed: int) -> None:
    """Tokenise and pack into the cache folder `path` (written under a temporary name, renamed when complete)."""
    import datasets

    ds = load_texts(specs, field, cfg, streaming=False)
    if part:
        ds = split_documents(ds, part, cfg.validation_fraction, seed)
    text_field = cfg.text_field

    def tokenise(batch: dict[str, list]) -> dict[str, list]:
        return {"ids": tokenizer(text_column(batch[text_field], field, text_field),
                                 add_special_tokens=False)["input_ids"]}

    docs = ds.map(tokenise, batched=True, batch_size=1000, remove_columns=ds.column_names,
                  num_proc=tokenise_workers(cfg, len(ds)), desc=f"tokenising {field}")
    tmp = path.with_name(path.name + ".tmp")
    gen_cache = path.with_name(path.name + ".gen")
    # packed in document order with one carry across the whole corpus: every token is kept but the last
    # partial block's (packing each 1000-document batch alone dropped its tail: 2-8 % of short documents)
    packed = datasets.Dataset.from_generator(
        _blocks, gen_kwargs={"docs": docs, "eos": tokenizer.eos_token_id, "seq_len": seq_len},
        features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}),
        cache_dir=str(gen_cache))
    packed.save_to_disk(str(tmp))
    total = sum(len(ids) + 1 for ids in docs["ids"])  # every document's tokens and its EOS
    (tmp / COUNTS).write_text(json.dumps({"tokens": total, "kept": len(packed) * seq_len, "documents": len(docs)}))
    del packed
    shutil.rmtree(gen_cache, ignore_errors=True)
    tmp.rename(path)  # a half-written cache never looks complete


def _load_packed(path: Path, field: str, cfg: TrainData, seq_len: int, part: str | None):
    """The packed blocks of a finished cache folder, with the corpus counts the run header shows."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    counts = json.loads((path / COUNTS).read_text()) if (path / COUNTS).is_file() else {}
    if len(ds) == 0 and part == "validation":
        raise MoemergeError(f"data.validation_fraction = {cfg.validation_fraction}: the held-out documents of "
                            f"data.train hold {counts.get('tokens', 'fewer')} tokens, fewer than one block of "
                            f"seq_len={seq_len}; raise it, lower seq_len, or give data.validation files")
    if len(ds) == 0:
        raise MoemergeError(f"data.{field}: {counts.get('tokens', 'fewer')} tokens after tokenisation "
                            f"({counts.get('documents', '?')} documents), fewer than one block of seq_len={seq_len}; "
                            "add text or lower seq_len")
    ds = ds.with_format("torch")
    ds.moemerge_counts = counts  # tokens in the corpus and kept in blocks: the run header shows them
    return ds


def tokenise_workers(cfg: TrainData, n_docs: int) -> int | None:
    """`datasets` worker processes for tokenising: `data.num_proc`, else the usable cores; never more than one
    per 1000-document batch (a process costs a second or two to start). None means in this process."""
    from mergekit_lite.threads import usable_cores

    n = min(cfg.num_proc or usable_cores(), max(1, -(-n_docs // 1000)))
    return n if n > 1 else None


def _blocks(docs, eos: int, seq_len: int) -> Iterator[dict[str, list[int]]]:
    """Blocks of `seq_len` tokens from tokenised documents (column `ids`), joined with EOS, in order."""
    yield from ({"input_ids": b} for b in pack_stream((row["ids"] for row in docs), eos, seq_len))


def pack_stream(docs: Iterator[list[int]], eos: int, seq_len: int) -> Iterator[list[int]]:
    """Blocks from documents pulled one at a time: a caller that stops after a block has taken from `docs`
    exactly the documents up to the one that block ends in."""
    carry: list[int] = []
    for ids in docs:
        blocks, carry = pack_ids([ids], eos, seq_len, carry)
        yield from blocks


def batch_order(n_blocks: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of block indices for one epoch, shuffled by (seed, epoch) only: resumable exactly."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    perm = torch.randperm(n_blocks, generator=g).tolist()
    return [perm[i:i + batch] for i in range(0, n_blocks - batch + 1, batch)]


def blend_order(sizes: list[int], weights: list[float], n_samples: int, seed: int) -> list[int]:
    """Indices into the concatenation of sources of `sizes` blocks: sample i comes from the source furthest
    behind its share (argmax of w_s * (i + 1) - taken_s, Megatron's blended dataset), so every prefix of the
    order holds each source in its share to within one block; within a source, blocks in a seeded order per
    pass (epoch). A function of the seed and the sample index only: resumable on any process count."""
    total = sum(weights)
    share = [w / total for w in weights]
    offsets = [sum(sizes[:s]) for s in range(len(sizes))]
    taken = [0] * len(sizes)
    perm: dict[int, tuple[int, list[int]]] = {}  # source -> (epoch, its seeded block order for that pass)
    order = []
    for _ in range(n_samples):
        s = next_source(share, taken)
        epoch, pos = divmod(taken[s] - 1, sizes[s])  # this sample is the source's taken[s]-th
        if perm.get(s, (None,))[0] != epoch:
            g = torch.Generator().manual_seed(seed * 1000003 + epoch * 7919 + s)
            perm[s] = (epoch, torch.randperm(sizes[s], generator=g).tolist())
        order.append(offsets[s] + perm[s][1][pos])
    return order


def next_source(share: list[float], taken: list[int]) -> int:
    """The source of a blend's next sample: the one furthest behind its share (argmax of share * (i + 1) - taken,
    ties: the first), counted into `taken`; so every prefix of a blend holds each source in its share to within
    one sample (Megatron's blended dataset)."""
    i = sum(taken)
    s = max(range(len(share)), key=lambda j: share[j] * (i + 1) - taken[j])
    taken[s] += 1
    return s
