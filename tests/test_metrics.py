"""Corpus-level metrics (lmlab.evaluation.metrics) against sacreBLEU's own scores of the same strings."""

from __future__ import annotations

import pytest
import sacrebleu

from lmlab.evaluation.metrics import CorpusScore


def test_metric_objects_equal_sacrebleu_on_fixed_strings() -> None:
    hypotheses = ["the cat sat on the mat.", "a dog, barking loudly!", "It's 3 o'clock", "nothing here matches"]
    references = ["the cat sat on a mat.", "a dog was barking loudly!", "it's 3 o'clock.", "completely different"]
    for name, score in (("bleu", sacrebleu.corpus_bleu), ("chrf", sacrebleu.corpus_chrf)):
        metric = CorpusScore(name)
        for i in (0, 2):  # two batches, as in an epoch
            metric.update(hypotheses[i : i + 2], references[i : i + 2])
        assert float(metric.compute()) == pytest.approx(score(hypotheses, [references]).score, abs=1e-9)
    lowercase = CorpusScore("bleu", lowercase=True)
    lowercase.update(hypotheses, references)
    expected = sacrebleu.corpus_bleu(hypotheses, [references], lowercase=True).score
    assert (
        float(lowercase.compute()) == pytest.approx(expected)
        and expected > sacrebleu.corpus_bleu(hypotheses, [references]).score
    )
