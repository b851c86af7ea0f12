"""Corpus-level translation metrics as torchmetrics ``Metric`` objects.

sacreBLEU's corpus BLEU and chrF are functions of sentence statistics summed over the corpus
(n-gram matches and totals, lengths). Keeping those sums as metric state gives exactly sacreBLEU's
numbers batch by batch, and under DDP the sums add up across processes like any torchmetrics state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from sacrebleu.metrics import BLEU, CHRF
from torchmetrics import Metric

SCORERS = {"bleu": BLEU, "chrf": CHRF}


class CorpusScore(Metric):
    """sacreBLEU's ``bleu`` or ``chrf`` (0-100) of hypotheses against one reference each; ``options`` are
    the sacreBLEU metric's own (e.g. ``lowercase=True``, ``tokenize="13a"``)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, name: str, **options: Any) -> None:
        super().__init__()
        if name not in SCORERS:
            raise ValueError(f"unknown corpus metric {name!r}; use one of {', '.join(SCORERS)}")
        self.scorer = SCORERS[name](**options)
        size = len(self.scorer._extract_corpus_statistics(["a"], [["a"]])[0])
        self.add_state("stats", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, hypotheses: Sequence[str], references: Sequence[str]) -> None:
        if not hypotheses:
            return
        stats = self.scorer._extract_corpus_statistics(list(hypotheses), [list(references)])
        self.stats += torch.tensor(stats, dtype=torch.float64, device=self.stats.device).sum(0)

    def compute(self) -> torch.Tensor:
        stats = [int(round(x)) for x in self.stats.tolist()]
        return torch.tensor(self.scorer._compute_score_from_stats(stats).score, dtype=torch.float64)
