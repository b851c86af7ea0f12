"""Split names, and which splits a source must read to serve the ones asked for."""

from __future__ import annotations

from collections.abc import Collection, Mapping

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
