"""Streamed training data that knows where it is: packed blocks from a streamed dataset, resumable in place.

Every stage is an iterator with a `state()`, the position after the last item it gave: the documents
(`datasets`' own `IterableDataset.state_dict()` at the start of the tokenised chunk, plus the rows taken from
it), the tokens packed but not yet given out, the shuffle buffer and its RNG, the blend's counts and the pass.
`StreamedBlocks` keeps the state after each of its last blocks, so the checkpoint of step s stores the state
after exactly the blocks those s steps trained on (the loader may have read a little ahead), and a resumed
run starts there: `datasets` seeks its files to the recorded chunk instead of the run tokenising the whole
consumed prefix again (the order, hence the run, is the same as an uninterrupted one's).
"""

from __future__ import annotations

import collections
import copy
import random
from collections.abc import Iterator
from typing import Any

import torch

from mergekit_lite.errors import MoemergeError
from mergekit_lite.train.data import load_texts, next_source, text_column

SNAPSHOTS = 4096  # block states kept: covers what a loader reads ahead of training


class DocStream:
    """Token ids of each non-blank document of a streamed dataset, tokenised `batch` documents at a time.

    `position` (after the last document given) is `datasets`' state at the start of its chunk and the rows
    taken from that chunk; `DocStream(..., position=p)` continues right after that document.
    """

    def __init__(self, specs, field, cfg, tokenizer, position: dict | None = None, batch: int = 256):
        self.field, self.cfg, self.tokenizer, self.batch = field, cfg, tokenizer, batch
        self.ds = load_texts(specs, field, cfg, streaming=True)
        # the state at the start of the chunk being read; None: the dataset's start (its state_dict() before the
        # first row is read again may still be that of an earlier iteration, such as load_texts' peek)
        self.base: dict | None = None if position is None else position["ds"]
        self.skip: int = 0 if position is None else position["row"]
        if self.base is not None:
            self.ds.load_state_dict(copy.deepcopy(self.base))
        self.rows = iter(self.ds)
        self.first = True
        self.ready: collections.deque = collections.deque()  # (ids, rows of the chunk taken after it)
        self.position = position

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        while not self.ready:
            base = self.base if self.first else copy.deepcopy(self.ds.state_dict())
            offset, self.first = self.skip, False
            for _ in range(self.skip):  # the rows of a resumed chunk that came before the position
                next(self.rows, None)
            self.skip = 0
            chunk = [row[self.cfg.text_field] for _, row in zip(range(self.batch), self.rows)]
            if not chunk:
                raise StopIteration
            text_column(chunk, self.field, self.cfg.text_field)  # a value that is not text: one line
            keep = [i for i, t in enumerate(chunk) if t and t.strip()]  # blank lines are not documents
            ids = self.tokenizer([chunk[i] for i in keep], add_special_tokens=False)["input_ids"] if keep else []
            self.ready.extend((d, {"ds": base, "row": offset + i + 1}) for i, d in zip(keep, ids))
        ids, self.position = self.ready.popleft()
        return ids


class PackedBlocks:
    """Blocks of `seq_len` tokens from documents joined with EOS, in order; `state()` holds the documents'
    position and the tokens read but not yet given out (a resumed one gives those first)."""

    def __init__(self, docs: DocStream, eos: int, seq_len: int, pending: list[int] | None = None):
        self.docs, self.eos, self.seq_len = docs, eos, seq_len
        self.buf = list(pending or [])

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        while len(self.buf) < self.seq_len:
            self.buf += next(self.docs) + [self.eos]  # StopIteration ends the blocks: the partial one is dropped
        block, self.buf = self.buf[:self.seq_len], self.buf[self.seq_len:]
        return block

    def state(self) -> dict:
        """The documents' position and the tokens read but not given out."""
        return {"docs": self.docs.position, "pending": list(self.buf)}


class Shuffled:
    """A seeded shuffle buffer of `size` items over an iterator with a `state()` (as `datasets`' and tf.data's):
    each item out is drawn from the buffer and replaced by the next one in; at the end the rest comes out in a
    seeded order. The same seed gives the same order."""

    def __init__(self, items, size: int, seed: int, state: dict | None = None):
        self.items, self.size = items, size
        self.rng = random.Random(seed)
        self.buf: list = []
        self.draining = False
        if state is not None:
            self.buf, self.draining = list(state["buf"]), state["draining"]
            self.rng.setstate(_tuples(state["rng"]))

    def __iter__(self):
        return self

    def __next__(self):
        while not self.draining:
            try:
                item = next(self.items)
            except StopIteration:
                self.draining = True
                self.rng.shuffle(self.buf)
                break
            if len(self.buf) < self.size:
                self.buf.append(item)
                continue
            j = self.rng.randrange(self.size)
            self.buf[j], item = item, self.buf[j]
            return item
        if not self.buf:
            raise StopIteration
        return self.buf.pop(0)

    def state(self, inner: bool = True) -> dict:
        """The buffer, its RNG and phase; with `inner`, the wrapped iterator's state too."""
        state = {"buf": list(self.buf), "rng": self.rng.getstate(), "draining": self.draining}
        return {**state, "inner": self.items.state()} if inner else state


def shuffled(items: Iterator, size: int, seed: int) -> Iterator:
    """`Shuffled` over a plain iterator (no state)."""
    return Shuffled(iter(items), size, seed)


def _tuples(x: Any) -> Any:
    """`random.getstate()` is nested tuples; a state that went through a checkpoint may hold lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class SourcePasses:
    """One source's blocks over passes (epochs), each pass leaving out the documents the first `skip` blocks
    come from (the held-out validation blocks) and, with `shuffle` > 1, shuffled by (seed, pass)."""

    def __init__(self, owner: StreamedBlocks, specs, skip: int, shuffle: int, state: dict | None = None):
        self.owner, self.specs, self.skip, self.shuffle = owner, specs, skip, shuffle
        self.epoch, self.blocks = 0, None
        self.yielded = False
        if state is not None:
            self.epoch, self.yielded = state["epoch"], True
            self.blocks = self._pass(state["pass"])

    def _pass(self, state: dict | None = None):
        specs, field, cfg, tokenizer, seq_len = self.owner.spec_args(self.specs)
        inner = state.get("inner", state) if state else None
        docs = DocStream(specs, field, cfg, tokenizer, position=inner["docs"] if inner else None)
        blocks: PackedBlocks | Shuffled = PackedBlocks(docs, tokenizer.eos_token_id, seq_len,
                                                       inner["pending"] if inner else None)
        if state is None:
            for _ in zip(range(self.skip), blocks):
                pass  # the held-out documents are read and dropped
            blocks = PackedBlocks(docs, tokenizer.eos_token_id, seq_len)  # starts after the held-out documents
        if self.shuffle > 1:
            blocks = Shuffled(blocks, self.shuffle, self.owner.seed * 1000003 + self.epoch,
                              state=state if state and "buf" in state else None)
        return blocks

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        while True:
            if self.blocks is None:
                self.blocks = self._pass()
            try:
                block = next(self.blocks)
                self.yielded = True
                return block
            except StopIteration:
                if not self.yielded:
                    where = (f"data.{self.owner.field} entry {self.specs[0]!r}" if self.owner.weights
                             else f"data.{self.owner.field}")
                    raise MoemergeError(f"{where}: the stream holds no block of {self.owner.seq_len} tokens beyond "
                                        "the validation blocks; add text or lower seq_len") from None
                self.epoch, self.blocks = self.epoch + 1, None

    def state(self) -> dict:
        """The pass and the position inside it (None between passes)."""
        return {"epoch": self.epoch, "pass": None if self.blocks is None else self.blocks.state()}


class Blend:
    """Blocks drawn from several sources in fixed shares: the source furthest behind its share next (ties: the
    first), so every prefix holds each source in its share to within one block."""

    def __init__(self, sources: list[SourcePasses], share: list[float], state: dict | None = None):
        self.sources, self.share = sources, share
        self.taken = list(state["taken"]) if state else [0] * len(share)

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        return next(self.sources[next_source(self.share, self.taken)])

    def state(self) -> dict:
        """Each source's count of blocks given and its own state."""
        return {"taken": list(self.taken), "sources": [s.state() for s in self.sources]}


class StreamedBlocks(torch.utils.data.IterableDataset):
    """Packed blocks from a stream, re-read from the start when exhausted (passes), resumable in place.

    `limit` stops after block `limit` (the held-out validation stream). `skip` leaves out, on every pass, the
    documents the first `skip` blocks come from (whole documents, the one the last of them ends in included),
    so the training stream shares no document with that validation stream.

    With `weights`, each entry of `specs` is a source streamed and packed on its own (each with its own passes),
    drawn by `Blend`, and the whole blend goes through one shuffle buffer; `skip` and `limit` are shared out in
    the weights' proportions. `state_after(n)` is the position after the first n blocks of this iteration (one
    of the last `SNAPSHOTS`), and `resume_from(state)` makes the next iteration start there.
    """

    def __init__(self, specs, field, cfg, tokenizer, seq_len, skip: int = 0, limit: int | None = None,
                 shuffle: int = 0, seed: int = 0, weights: list[float] | None = None):
        self.specs, self.field, self.cfg, self.tokenizer, self.seq_len = specs, field, cfg, tokenizer, seq_len
        self.skip, self.limit = skip, limit
        self.shuffle, self.seed = shuffle, seed  # shuffle: blocks in the seeded buffer (0: the stream's order)
        self.weights = weights
        self.share = [w / sum(weights) for w in weights] if weights else None
        if self.share:
            self.moemerge_sources = [(spec, None, w) for spec, w in zip(specs, self.share)]  # the run header's lines
        self.start: dict | None = None
        self.snapshots: collections.OrderedDict[int, dict] = collections.OrderedDict()

    def spec_args(self, specs):
        """What a `DocStream` over `specs` needs (and the block size)."""
        return specs, self.field, self.cfg, self.tokenizer, self.seq_len

    def resume_from(self, state: dict) -> None:
        """Start the next iteration at `state` (from `state_after`, saved in a checkpoint)."""
        self.start = state

    def state_after(self, n: int) -> dict | None:
        """The position after the first `n` blocks the current iteration gave; None when it was not kept (a loader
        that read more than `SNAPSHOTS` blocks ahead): the checkpoint then resumes by re-reading, as older ones do,
        rather than the run failing at its checkpoint."""
        return self.snapshots.get(n)

    def __iter__(self):
        if self.limit is not None:  # validation: each source's held-out blocks, one source after the other
            limits = _share_of(self.limit, self.share) if self.share else [self.limit]
            for spec, limit in zip([[s] for s in self.specs] if self.share else [self.specs], limits):
                docs = DocStream(*self.spec_args(spec)[:4])
                for block in zip(range(limit), PackedBlocks(docs, self.tokenizer.eos_token_id, self.seq_len)):
                    yield {"input_ids": torch.tensor(block[1])}
            return
        start, self.start = self.start, None
        stream, state = self._pipeline(start)
        self.snapshots.clear()
        n = start["blocks"] if start else 0
        for block in stream:
            n += 1
            self.snapshots[n] = {"blocks": n, **state()}
            if len(self.snapshots) > SNAPSHOTS:
                self.snapshots.popitem(last=False)
            yield {"input_ids": torch.tensor(block)}

    def _pipeline(self, start: dict | None):
        """(iterator of blocks, function giving its state after the last block)."""
        if not self.share:
            passes = SourcePasses(self, self.specs, self.skip, self.shuffle, start and start["source"])
            return passes, lambda: {"source": passes.state()}
        skips = _share_of(self.skip, self.share)
        states = start["blend"]["sources"] if start else [None] * len(self.specs)
        sources = [SourcePasses(self, [spec], skip, 0, st) for spec, skip, st in zip(self.specs, skips, states)]
        blend = Blend(sources, self.share, start and start["blend"])
        if self.shuffle > 1:
            mixed = Shuffled(blend, self.shuffle, self.seed * 1000003, state=start and start["shuffle"])
            return mixed, lambda: {"blend": blend.state(), "shuffle": mixed.state(inner=False)}
        return blend, lambda: {"blend": blend.state()}


def _share_of(n: int, share: list[float]) -> list[int]:
    """`n` blocks shared out in proportion to `share`, at least one each (held-out validation blocks)."""
    return [max(1, round(n * s)) for s in share]
