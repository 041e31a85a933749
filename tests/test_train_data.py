"""Training data: the held-out split shares no document with training, packed (cached) and streamed."""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path

import pytest

from mergekit_lite.recipe import TrainRecipe, validate_recipe
from mergekit_lite.train.loaders import build_loaders

N_DOCS = 400


class One:  # what build_loaders needs from an Accelerator, for one process
    num_processes, is_main_process = 1, True

    @staticmethod
    def wait_for_everyone():
        pass


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Document i is the word `d<i>` repeated 3..60 times; a word-level tokenizer makes each word one token,
    so every token of a block names the document it came from."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    (root / "train.txt").write_text("".join(" ".join([f"d{i}"] * rng.randint(3, 60)) + "\n" for i in range(N_DOCS)))
    vocab = {"<unk>": 0, "</s>": 1, **{f"d{i}": i + 2 for i in range(N_DOCS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    tokenizer.save_pretrained(str(root / "tok"))
    return root, tokenizer


def docs_in(blocks) -> set[int]:
    """Documents whose tokens appear in the blocks (token id i + 2 is document i; 1 is EOS)."""
    return {t - 2 for b in blocks for t in b["input_ids"].reshape(-1).tolist() if t >= 2}


def loaders(corpus, out: Path, seed: int = 0, **data):
    root, tokenizer = corpus
    r = validate_recipe({"model": str(root / "tok"), "data": {"train": [str(root / "train.txt")], **data},
                         "seq_len": 16, "micro_batch_size": 4, "max_steps": 300, "learning_rate": 1e-3,
                         "seed": seed, "output": str(out)}, TrainRecipe)
    return build_loaders(r, tokenizer, root / "tok", One, r.max_steps)


@pytest.mark.parametrize("fraction", [0.1, 0.2])
def test_held_out_documents_are_never_trained_on(corpus, tmp_path, fraction):
    train_dl, val_dl = loaders(corpus, tmp_path / "run", validation_fraction=fraction)
    train, val = docs_in(train_dl.dataset), docs_in(val_dl.dataset)
    assert not train & val  # the old split of packed blocks shared ~all held-out documents
    assert len(val) == pytest.approx(fraction * N_DOCS, abs=2)  # by document: the split's own count
    assert len(train | val) >= N_DOCS - 3  # each 1000-document batch drops at most a partial block
    cached = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "run" / "cache").iterdir())
    assert cached == ["packed-train", "packed-validation"]


def test_cache_key_covers_the_split(corpus, tmp_path):
    out = tmp_path / "run"  # one output folder, so one cache, for every run below

    def held_out(fraction: float, seed: int) -> set[int]:
        return docs_in(loaders(corpus, out, seed, validation_fraction=fraction)[1].dataset)

    first = held_out(0.1, 0)
    assert len(held_out(0.2, 0)) > 1.5 * len(first)  # not the 0.1 split read back from the cache
    assert held_out(0.1, 1) != first  # the seed picks the documents
    assert held_out(0.1, 0) == first  # the same split comes back from its cache
    assert len(list((out / "cache").iterdir())) == 6  # (train, validation) x 3 splits


def test_streamed_held_out_documents_are_never_trained_on(corpus, tmp_path):
    train_dl, val_dl = loaders(corpus, tmp_path / "stream", streaming=True, validation_blocks=20)
    val_blocks = list(val_dl.dataset)
    assert len(val_blocks) == 20
    train_blocks = list(itertools.islice(iter(train_dl.dataset), 1500))  # more than one pass: every pass skips
    train, val = docs_in(train_blocks), docs_in(val_blocks)
    assert not train & val
    assert val == set(range(len(val)))  # the first documents of the stream
    assert train == set(range(len(val), N_DOCS))  # whole documents only are left out


def test_corpus_does_not_depend_on_what_the_process_imported():
    """The quickstart/test corpus (hence the tokenizer and every figure) is the same in every process."""
    import subprocess
    import sys

    code = ("import hashlib{}; from mergekit_lite.train.corpus import stdlib_docstrings; "
            "print(hashlib.sha256('\\n'.join(stdlib_docstrings()).encode()).hexdigest())")
    bare = subprocess.run([sys.executable, "-c", code.format("")], capture_output=True, text=True, check=True)
    busy = subprocess.run([sys.executable, "-c", code.format(", logging.handlers, email.mime.text, http.server, "
                                                                   "unittest.mock, concurrent.futures")],
                          capture_output=True, text=True, check=True)
    assert bare.stdout.strip() == busy.stdout.strip() != ""


def test_packing_keeps_every_token_but_the_last_partial_block(corpus, tmp_path):
    """All documents joined with EOS in one stream: only the final < seq_len tokens may be left out (packing
    each 1000-document batch alone dropped each batch's tail)."""
    from mergekit_lite.train.data import packed_dataset

    root, tokenizer = corpus
    rng = random.Random(1)  # 2500 documents (several 1000-document tokenising batches), and blank lines
    text = "".join(" ".join([f"d{i % N_DOCS}"] * rng.randint(1, 9)) + ("\n  \n" if i % 7 == 0 else "\n")
                   for i in range(2500))
    (tmp_path / "many.txt").write_text(text)
    r = validate_recipe({"model": str(root / "tok"), "data": {"train": [str(tmp_path / "many.txt")],
                                                              "validation": [str(tmp_path / "many.txt")]},
                         "seq_len": 16, "micro_batch_size": 4, "max_steps": 1, "learning_rate": 1e-3,
                         "output": str(tmp_path / "run")}, TrainRecipe)
    ds = packed_dataset(r.data.train, "train", r.data, tokenizer, root / "tok", 16, tmp_path / "cache", True,
                        None)
    lines = [line for line in text.splitlines() if line.strip()]
    total = sum(len(line.split()) + 1 for line in lines)  # tokens + one EOS per document
    assert total - 16 < len(ds) * 16 <= total
    flat = [t for b in ds["input_ids"] for t in b.tolist()]
    want = [t for line in lines for t in [int(line.split()[0][1:]) + 2] * len(line.split()) + [1]]
    assert flat == want[:len(flat)]  # in document order, nothing skipped
    assert not any(p.name.endswith((".gen", ".tmp")) for p in (tmp_path / "cache").iterdir())


def test_undecodable_text_names_the_file_and_offers_data_encoding(corpus, tmp_path):
    from mergekit_lite.errors import MoemergeError

    root, _ = corpus
    latin = tmp_path / "latin.txt"
    latin.write_bytes(("d1 d2 caf\u00e9 d3\n" * 50).encode("latin-1"))
    with pytest.raises(MoemergeError, match=rf"^data.train: {latin} is not utf-8 text \(invalid continuation byte at "
                                            r"byte \d+\); set data.encoding to the file's encoding"):
        loaders(corpus, tmp_path / "run", validation=[str(root / "train.txt")], train=[str(latin)])
    train_dl, _ = loaders(corpus, tmp_path / "run2", validation=[str(root / "train.txt")], train=[str(latin)],
                          encoding="latin-1")
    assert len(train_dl.dataset) > 0


def test_a_text_column_holding_numbers_is_one_line(corpus, tmp_path):
    from mergekit_lite.errors import MoemergeError

    root, _ = corpus
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "d1 d2 d3"}\n{"text": 42}\n')
    with pytest.raises(MoemergeError, match=r"^data.train: column 'text' holds a int \('42'\), not text; point "
                                            r"data.text_field"):
        loaders(corpus, tmp_path / "run", validation=[str(root / "train.txt")], train=[str(rows)])


def test_tokenising_with_worker_processes_packs_the_same_blocks(corpus, tmp_path):
    """`data.num_proc` worker processes give the very blocks one process gives (order kept)."""
    from mergekit_lite.train.data import packed_dataset, tokenise_workers

    root, tokenizer = corpus
    rng = random.Random(2)
    (tmp_path / "big.txt").write_text("".join(" ".join([f"d{i % N_DOCS}"] * rng.randint(1, 9)) + "\n"
                                              for i in range(3000)))
    blocks = {}
    for n in (1, 3):
        r = validate_recipe({"model": str(root / "tok"), "data": {"train": [str(tmp_path / "big.txt")],
                                                                  "num_proc": n},
                             "seq_len": 16, "micro_batch_size": 4, "max_steps": 1, "learning_rate": 1e-3,
                             "output": str(tmp_path / "run")}, TrainRecipe)
        assert tokenise_workers(r.data, 3000) == (None if n == 1 else 3)
        ds = packed_dataset(r.data.train, "train", r.data, tokenizer, root / "tok", 16, tmp_path / f"cache{n}",
                            True, None)
        blocks[n] = [b.tolist() for b in ds["input_ids"]]
    assert blocks[1] == blocks[3] and len(blocks[1]) > 100
    assert tokenise_workers(r.data, 400) is None  # one batch: no process to start


def test_a_weighted_blend_draws_each_corpus_in_its_share(corpus, tmp_path):
    """Two corpora (documents d0-d99 and d200-d299) weighted 1:3: every prefix of the run's samples holds them
    1:3 to within a block, each corpus packed on its own; the order is fixed by the seed."""
    root, tokenizer = corpus
    for name, first in (("a.txt", 0), ("b.txt", 200)):
        (tmp_path / name).write_text("".join(" ".join([f"d{first + i % 100}"] * 5) + "\n" for i in range(300)))
    r = validate_recipe({"model": str(root / "tok"), "data": {
        "train": [{"path": str(tmp_path / "a.txt"), "weight": 1}, {"path": str(tmp_path / "b.txt"), "weight": 3}],
        "validation": [str(root / "train.txt")]}, "seq_len": 16, "micro_batch_size": 4, "max_steps": 200,
        "learning_rate": 1e-3, "output": str(tmp_path / "run")}, TrainRecipe)
    assert r.data.weights == [1.0, 3.0]
    train_dl, _ = build_loaders(r, tokenizer, root / "tok", One, r.max_steps)
    sources = []
    for batch in itertools.islice(train_dl, 200):
        for block in batch["input_ids"]:
            first = int(block[0])  # every token of a block comes from one corpus
            sources.append("a" if 2 <= first < 102 or (first == 1 and 2 <= int(block[1]) < 102) else "b")
    for n in (4, 40, 400, 800):
        assert abs(sources[:n].count("a") - n / 4) <= 1, (n, sources[:n].count("a"))
    again, _ = build_loaders(r, tokenizer, root / "tok", One, r.max_steps)
    assert list(train_dl.batch_sampler)[:50] == list(again.batch_sampler)[:50]
    assert [s for s, _, _ in train_dl.dataset.moemerge_sources] == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]


def test_streamed_blend_draws_in_the_weights_shares_and_holds_out_each_source(corpus, tmp_path):
    """Streaming with weights: each source streamed and packed on its own, blocks drawn 1:3 to within a block
    over every prefix (before the shuffle buffer: `shuffle_buffer: 0`), validation blocks taken from each
    source in the same shares and never trained on; a source too short says which entry it is."""
    root, tokenizer = corpus
    for name, first in (("a.txt", 0), ("b.txt", 200)):  # document i: word d<first+i>, five times
        (tmp_path / name).write_text("".join(" ".join([f"d{first + i}"] * 5) + "\n" for i in range(100)))
    base = {"model": str(root / "tok"), "seq_len": 16, "micro_batch_size": 4, "max_steps": 200,
            "learning_rate": 1e-3, "output": str(tmp_path / "run")}
    data = {"train": [{"path": str(tmp_path / "a.txt"), "weight": 1}, {"path": str(tmp_path / "b.txt"), "weight": 3}],
            "streaming": True, "validation_blocks": 8}
    r = validate_recipe({**base, "data": {**data, "shuffle_buffer": 0}}, TrainRecipe)
    train_dl, val_dl = build_loaders(r, tokenizer, root / "tok", One, r.max_steps)
    blocks = list(itertools.islice(iter(train_dl.dataset), 400))  # several passes over a.txt (~37 blocks a pass)
    sources = ["a" if docs_in([b]) < set(range(100)) else "b" for b in blocks]
    assert all(docs_in([b]) < set(range(100)) or docs_in([b]) < set(range(200, 300)) for b in blocks)
    for n in (4, 40, 400):
        assert abs(sources[:n].count("a") - n / 4) <= 1, (n, sources[:n].count("a"))
    val = list(val_dl.dataset)
    assert len(val) == 8 and ["a" if docs_in([b]) < set(range(100)) else "b" for b in val] == ["a"] * 2 + ["b"] * 6
    assert not docs_in(val) & docs_in(blocks)
    assert [w for _, _, w in train_dl.dataset.moemerge_sources] == [0.25, 0.75]

    shuffled = build_loaders(validate_recipe({**base, "data": data}, TrainRecipe), tokenizer, root / "tok", One, 200)[0]
    mixed = list(itertools.islice(iter(shuffled.dataset), 400))
    assert [b["input_ids"].tolist() for b in mixed] != [b["input_ids"].tolist() for b in blocks]  # the buffer shuffles
    assert not docs_in(val) & docs_in(mixed)

    (tmp_path / "tiny.txt").write_text("d3 d3\n")
    short = validate_recipe({**base, "data": {**data, "train": [str(tmp_path / "a.txt"), str(tmp_path / "tiny.txt")],
                                                     "weights": [1, 1]}}, TrainRecipe)
    from mergekit_lite.errors import MoemergeError

    with pytest.raises(MoemergeError, match=r"data.train entry '.*tiny.txt': the stream holds no block of 16"):
        list(itertools.islice(iter(build_loaders(short, tokenizer, root / "tok", One, 200)[0].dataset), 10))


def test_weights_must_match_the_entries(corpus, tmp_path):
    from mergekit_lite.errors import MoemergeError

    base = {"seq_len": 16, "micro_batch_size": 4, "max_steps": 1, "learning_rate": 1e-3, "output": "o"}
    with pytest.raises(MoemergeError, match=r"data.weights has 1 values for 2 train entries"):
        validate_recipe({**base, "model": "m", "data": {"train": ["a", "b"], "weights": [1]}}, TrainRecipe)
    with pytest.raises(MoemergeError, match=r"weights.0 = 0: Input should be greater than 0|greater than 0"):
        validate_recipe({**base, "model": "m", "data": {"train": ["a"], "weights": [0]}}, TrainRecipe)


def _main_builds_worker(rank: int, init: str, case: str, out: str) -> None:
    """One of two gloo processes calling `main_builds`; writes what it got (result or error) to out/rank."""
    import time
    from types import SimpleNamespace

    import torch.distributed as dist

    from mergekit_lite.errors import MoemergeError, PeerWaitError
    from mergekit_lite.train.engine import main_builds

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    acc = SimpleNamespace(num_processes=2, is_main_process=rank == 0, process_index=rank)
    marker = Path(out) / "built"

    def build():
        if rank == 0:
            if case == "fails":
                raise MoemergeError("data.train: 'x.txt' is not UTF-8; set data.encoding")
            time.sleep(6 if case == "slow" else 1)
            marker.write_text("done")
        return marker.read_text()  # the others read what the main process wrote: it must exist by then

    start = time.monotonic()
    try:
        got = "ok " + main_builds(acc, "tokenise and pack data.train into CACHE", build, timeout_minutes=0.05)
    except PeerWaitError as e:
        got = f"peer {e}"
    except MoemergeError as e:
        got = f"error {e}"
    (Path(out) / str(rank)).write_text(f"{time.monotonic() - start:.1f}\n{got}")
    if got.startswith("peer"):
        os._exit(0)  # as the CLI does: an ordinary exit after a timed-out gloo collective aborts
    dist.destroy_process_group()


@pytest.mark.parametrize("case", ["ok", "fails", "slow"])
def test_other_processes_wait_for_the_main_one_with_a_timeout_that_names_what(tmp_path, case):
    """The processes that wait for the main one's tokenisation get its result once it exists, its error at once
    when it fails (not after the process group's 30-minute timeout), and a named one-line error when it runs
    past `data.wait_minutes` (0.05 min = 3 s here)."""
    import torch.multiprocessing as mp

    mp.start_processes(_main_builds_worker, args=(f"file://{tmp_path}/init", case, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    took1, got1 = (tmp_path / "1").read_text().split("\n", 1)
    took0, got0 = (tmp_path / "0").read_text().split("\n", 1)
    if case == "ok":
        assert got0 == got1 == "ok done"
    elif case == "fails":
        assert got0 == got1 == "error data.train: 'x.txt' is not UTF-8; set data.encoding"
        assert float(took1) < 3
    else:  # each side's one line: the waiting one gave up, the main one finds nobody waiting any more
        assert got0.startswith("peer the other processes stopped waiting for the main process to tokenise and pack")
        assert got1.startswith("peer process 1 waited for the main process to tokenise and pack data.train into "
                               "CACHE and gave up (") and "raise data.wait_minutes (now 0.05)" in got1
        assert float(took1) < 5.5


def test_a_dataset_repository_is_read_by_config_split_and_revision(corpus, tmp_path, monkeypatch):
    """A downloaded Hub dataset snapshot (README.md declaring configs) is loaded by `data.config` and
    `data.split` as the Hub's would be; the cache key covers them; a Hub id offline is one line naming the
    options and how to work offline; config/split on a corpus of plain files is refused."""
    from mergekit_lite.errors import MoemergeError

    root, tokenizer = corpus
    repo = tmp_path / "fineweb-sample"
    for config, first in (("small", 0), ("large", 100)):
        for split, offset in (("train", 0), ("test", 50)):
            (repo / config).mkdir(parents=True, exist_ok=True)
            (repo / config / f"{split}.jsonl").write_text("".join(
                json.dumps({"text": " ".join([f"d{first + offset + i}"] * 8)}) + "\n" for i in range(40)))
    (repo / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
        f"  - split: test\n    path: {c}/test.jsonl\n" for c in ("small", "large")) + "---\n# a sample\n")

    def docs(**data):
        return docs_in(loaders(corpus, tmp_path / "run", train=str(repo), validation=str(repo),
                               validation_split="test", **data)[0].dataset)

    assert docs(config="small") == set(range(40))
    assert docs(config="large") == set(range(100, 140))  # not the small config read back from the cache
    assert docs(config="large", split="test") == set(range(150, 190))
    with pytest.raises(MoemergeError, match=r"data.train: cannot load dataset '.*fineweb-sample' \(name 'nope', "
                                            r"split 'train'\): .*; check data.config"):
        docs(config="nope")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached: the Hub would have to be reached
    with pytest.raises(MoemergeError, match=r"data.train: cannot load dataset 'HuggingFaceFW/fineweb-edu' \(name "
                                            r"'sample-10BT', split 'train', revision 'v1.4.0'\): .* offline, download "
                                            r"it first \(hf download --repo-type dataset HuggingFaceFW/fineweb-edu"):
        loaders(corpus, tmp_path / "hub", train="HuggingFaceFW/fineweb-edu", validation=str(root / "train.txt"),
                config="sample-10BT", revision="v1.4.0")

    from mergekit_lite.train.data import check_repo_options

    r = validate_recipe({"model": "m", "data": {"train": [str(root / "train.txt")], "config": "small"},
                         "seq_len": 16, "micro_batch_size": 4, "max_steps": 1, "learning_rate": 1e-3,
                         "output": "o"}, TrainRecipe)
    with pytest.raises(MoemergeError, match=r"data.config applies to dataset repositories .* data names only files"):
        check_repo_options(r.data)


class CountingTokenizer:
    """The corpus tokenizer, counting the documents it tokenises."""

    def __init__(self, tokenizer):
        self.tokenizer, self.documents = tokenizer, 0
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, texts, **kw):
        self.documents += len(texts)
        return self.tokenizer(texts, **kw)


@pytest.mark.parametrize("kind", ["one", "one-shuffled", "blend-shuffled"])
def test_a_stream_resumes_in_place_from_its_saved_position(corpus, tmp_path, kind):
    """The state after block n (as a checkpoint stores it, through torch.save/load weights_only) makes a new
    stream give exactly the blocks the first one gave after n, across passes and the shuffle buffer, without
    tokenising the documents before that position again (a stream re-read from the start tokenised them all)."""
    import io

    import torch

    from mergekit_lite.train.stream import StreamedBlocks

    root, tokenizer = corpus
    data = {"streaming": True, "shuffle_buffer": 0 if kind == "one" else 32, "validation_blocks": 8}
    if kind.startswith("blend"):
        (tmp_path / "b.txt").write_text("".join(" ".join([f"d{i}"] * 7) + "\n" for i in range(200, 260)))
        data |= {"train": [str(root / "train.txt"), str(tmp_path / "b.txt")], "weights": [3, 1]}
    r = validate_recipe({"model": str(root / "tok"), "data": {"train": [str(root / "train.txt")], **data},
                         "seq_len": 16, "micro_batch_size": 4, "max_steps": 1, "learning_rate": 1e-3,
                         "output": str(tmp_path / "run")}, TrainRecipe)

    def stream(tok):
        return StreamedBlocks(r.data.train, "train", r.data, tok, 16, skip=8, shuffle=r.data.shuffle_buffer,
                              seed=3, weights=r.data.weights)

    first = stream(tokenizer)
    blocks = [b["input_ids"].tolist() for b in itertools.islice(iter(first), 3000)]  # > 2 passes of train.txt
    assert first.state_after(3001) is None  # not given yet: the checkpoint falls back to re-reading
    for n in (5, 1200, 2500):
        saved = io.BytesIO()
        torch.save(first.state_after(n), saved)
        saved.seek(0)
        counting = CountingTokenizer(tokenizer)
        again = stream(counting)
        again.resume_from(torch.load(saved, weights_only=True))
        assert [b["input_ids"].tolist() for b in itertools.islice(iter(again), 200)] == blocks[n:n + 200], n
        if n == 1200:  # about 500 documents into the stream: only the rest of its chunk and what follows is read
            assert counting.documents < 400, counting.documents
