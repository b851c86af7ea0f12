"""Preparing a language-modeling split of any size, with the memory of a few batches: its text is read a
piece at a time, cut into lines, tokenized a batch of lines at a time (in ``num_proc`` processes, in order)
and appended to token shards on disk (:class:`~lmlab.data.storage.ShardWriter`).

A preparation that stops (killed, interrupted, out of disk) resumes from its last finished shard: the text
before it is read again but not tokenized. Lines are encoded apart, which is how every tokenizer here treats
text, so the stored ids equal a one-shot tokenization of the split.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.data.storage import ShardWriter, token_dtype
from lmlab.data.text_sources import DOC_END, SplitText
from lmlab.errors import DataError
from lmlab.tokenizers import Tokenizer, lines_of, tokenizer_from_state

log = logging.getLogger("lmlab")

#: characters of lines encoded together: enough for the Rust tokenizers to spread over cores, and for a
#: worker process's share of the work to outweigh handing it the lines
BATCH_CHARS = 1 << 20


@dataclass
class LineBatch:
    """Lines (and document ends) encoded together, and how many stream units they take: a unit per character
    and per document end, the position :class:`ShardWriter` records."""

    items: list[str | None]
    units: int

    @property
    def chars(self) -> int:
        return self.units - self.items.count(DOC_END)


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_split(
    folder: Path,
    name: str,
    text: SplitText,
    tokenizer: Tokenizer,
    shard_tokens: int,
    num_proc: int | None = None,
) -> dict[str, Any]:
    """Tokenize split ``name`` into shards in ``folder / name``, or finish a preparation that stopped there;
    returns what the meta data records of it: ``tokens``, ``chars`` (for bits per character) and ``shards``."""
    writer = ShardWriter(folder / name, tokenizer.vocab_size, shard_tokens)
    if not writer.done:
        if writer.position:
            log.info("Resuming the %s split after its %d finished shard(s)", name, len(writer.state["shards"]))
        if text.end_of_document and tokenizer.eos_id is None:
            raise no_end_of_text(tokenizer.kind)
        batches = line_batches(text.items(), writer.position, BATCH_CHARS)
        encoder = BatchEncoder(tokenizer, num_proc or available_cores())
        started, done_before = time.perf_counter(), writer.tokens
        total = text.span[1] - text.span[0] if text.span else None
        with progress_bar(name, total, done=writer.position) as advance:
            for batch, ids in encoder.map(batches):
                writer.append(ids, batch.units, batch.chars)
                advance(batch.units, writer.tokens - done_before)
        writer.finish()
        seconds = time.perf_counter() - started
        made = writer.tokens - done_before
        log.info(
            "Tokenized the %s split: %s tokens in %d shard(s), %.1f s (%s tokens/s)",
            name,
            f"{writer.tokens:,}",
            len(writer.state["shards"]),
            seconds,
            f"{made / max(seconds, 1e-9):,.0f}",
        )
    return {"tokens": writer.tokens, "chars": writer.chars, "shards": len(writer.state["shards"])}


def no_end_of_text(kind: str) -> DataError:
    """The error for document ends asked of a tokenizer that has no end-of-text token to mark them with."""
    return DataError(
        f"data.source.end_of_document needs a tokenizer with an end-of-text token; the {kind} tokenizer has "
        "none. Use tokenizer=bpe or tokenizer=word, or set data.source.end_of_document=false."
    )


def line_batches(items: Iterable[str | None], skip: int, batch_chars: int) -> Iterator[LineBatch]:
    """The lines of a stream in batches of at least ``batch_chars`` characters (the last may be smaller), after
    the first ``skip`` stream units, which a resumed preparation has already stored."""
    position, batch, units = 0, [], 0
    for item in lines_of(items):
        size = 1 if item is DOC_END else len(item)
        if position < skip:
            position += size
            continue
        batch.append(item)
        units += size
        if units >= batch_chars:
            yield LineBatch(batch, units)
            batch, units = [], 0
    if position < skip:
        raise DataError(
            f"The text is shorter than the part a stopped preparation already stored ({skip:,} characters): it "
            "changed since. Remove the cache folder's .partial entry and run again."
        )
    if batch:
        yield LineBatch(batch, units)


def encode_lines(tokenizer: Tokenizer, items: list[str | None], dtype: np.dtype) -> np.ndarray:
    """The ids of a batch of lines, one after the other, with the end-of-text id at each document end."""
    lines = [item for item in items if item is not DOC_END]
    encoded = iter(tokenizer.encode_batch(lines)[0])
    ends = [tokenizer.eos_id]
    parts = (ends if item is DOC_END else next(encoded) for item in items) if len(lines) < len(items) else encoded
    return np.fromiter(chain.from_iterable(parts), dtype=dtype)


class BatchEncoder:
    """Encodes batches in order: in this process, or in ``num_proc`` worker processes (started once a split has
    more than one batch), with at most two batches per worker in flight so memory stays bounded."""

    def __init__(self, tokenizer: Tokenizer, num_proc: int) -> None:
        self.tokenizer, self.num_proc = tokenizer, num_proc
        self.dtype = np.dtype(token_dtype(tokenizer.vocab_size))

    def map(self, batches: Iterator[LineBatch]) -> Iterator[tuple[LineBatch, np.ndarray]]:
        first = next(batches, None)
        if first is None:
            return
        if self.num_proc <= 1:
            for batch in chain([first], batches):
                yield batch, encode_lines(self.tokenizer, batch.items, self.dtype)
            return
        second = next(batches, None)
        if second is None:
            yield first, encode_lines(self.tokenizer, first.items, self.dtype)
            return
        yield from self._in_workers(chain([first, second], batches))

    def _in_workers(self, batches: Iterable[LineBatch]) -> Iterator[tuple[LineBatch, np.ndarray]]:
        pool = ProcessPoolExecutor(
            self.num_proc,
            # forked: a worker starts at once, with the tokenizer and the modules already loaded (shared pages)
            mp_context=multiprocessing.get_context("fork"),
            initializer=_start_worker,
            initargs=(self.tokenizer.state(), self.dtype.str),
        )
        pending: deque[tuple[LineBatch, Future]] = deque()
        try:
            for batch in batches:
                pending.append((batch, pool.submit(_encode_in_worker, batch.items)))
                if len(pending) >= 2 * self.num_proc:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


_worker: tuple[Tokenizer, np.dtype] | None = None


def _start_worker(state: dict[str, Any], dtype: str) -> None:
    global _worker
    # each worker encodes its batch alone: the processes are the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = tokenizer_from_state(state), np.dtype(dtype)


def _encode_in_worker(items: list[str | None]) -> np.ndarray:
    assert _worker is not None
    return encode_lines(_worker[0], items, _worker[1])


@contextmanager
def progress_bar(name: str, total: int | None, done: int = 0) -> Iterator[Any]:
    """A progress bar on a terminal (characters done, tokens made, tokens/s, time left when the total is known),
    nothing elsewhere; yields ``advance(units, tokens)``."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda units, tokens: None
        return
    columns = [
        TextColumn("tokenizing {task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed:,.0f} chars, {task.fields[tokens]:,} tokens, {task.fields[rate]} tokens/s"),
        TimeRemainingColumn(),
    ]
    started = time.perf_counter()
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(name, total=total, completed=done, tokens=0, rate="-")

        def advance(units: int, tokens: int) -> None:
            rate = f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}"
            progress.update(task, advance=units, tokens=tokens, rate=rate)

        yield advance
    sys.stderr.flush()
