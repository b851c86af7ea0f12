"""Split names, which splits a source must read to serve the ones asked for, and why a source has none of a split."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

SPLITS = ("train", "validation", "test")


def splits_to_read(
    wanted: Collection[str] | None, given: Collection[str], drawn_from_train: Mapping[str, float]
) -> set[str]:
    """The splits a source reads to serve ``wanted`` (``None``: every split it has).

    ``given`` are the splits the source has files for; a wanted split it lacks is drawn from the training
    split when its share in ``drawn_from_train`` is positive, so the training split is read then too. Scoring
    a checkpoint on a test file thus reads that file alone, even where the training files are gone.
    """
    if wanted is None:
        return set(given)
    read = set(wanted) & set(given)
    if "train" in wanted or any(s not in given and drawn_from_train.get(s, 0) > 0 for s in wanted):
        read.add("train")
    return read


def keep_wanted(splits: dict, wanted: Collection[str] | None) -> dict:
    """Only the wanted splits of what a source read (all of them for ``None``)."""
    return splits if wanted is None else {name: value for name, value in splits.items() if name in wanted}


def share_key(split: str) -> str:
    """The source setting that draws ``split`` from the training split."""
    return f"data.source.{'val' if split == 'validation' else split}_fraction"


def not_drawn(split: str, lacks: str, give: str, drawn: str) -> str:
    """Why a source has no ``split``: it ``lacks`` one of its own and draws none (its share of the training split
    is 0); the fix: ``give`` one, or set that share to draw one (``drawn``: how, e.g. "cut from the end of the
    training text")."""
    key = share_key(split)
    return f"{lacks} and {key} is 0 ({give}, or set {key} above 0 to have one {drawn})"


def hub_split_absent(path: str, data_files: Any, splits: Mapping[str, str], split: str, drawn: str) -> str:
    """:func:`not_drawn` for a hub data set (or local copies of its splits, ``data_files``): it has no split of the
    name ``data.source.splits`` maps to ``split``, or nothing is mapped to it."""
    mapped = splits.get(split)
    where = "data.source.data_files" if data_files else f"the data set '{path}'"
    lacks = f"{where} has no '{mapped}' split" if mapped else f"data.source.splits maps nothing to {split}"
    return not_drawn(split, lacks, f"map one of its splits to it (data.source.splits.{split}=<split>)", drawn)
