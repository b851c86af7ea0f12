"""Validation metrics of the language-modeling task against an independent computation:
perplexity is exp of the mean per-token loss, bits per character rescale it by the split's
characters per token."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lmlab.data.text_sources import carve_splits
from lmlab.train import build_datamodule, build_task


def _independent_loss(task: torch.nn.Module, loader) -> tuple[float, int]:
    """Mean per-token cross-entropy over every token of the loader, summed in float64."""
    task.net.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            logits, _ = task.net(x)
            total += F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).double(), y.reshape(-1), reduction="sum"
            ).item()
            count += y.numel()
    return total / count, count


@pytest.mark.parametrize(("model", "tokenizer"), [("gpt", "bpe"), ("lstm", "char"), ("gru", "word")])
def test_val_and_test_ppl_and_bpc_match_independent_computation(
    model: str, tokenizer: str, make_cfg, learnable_text: Path
) -> None:
    overrides = [
        f"model={model}",
        "model.n_layer=1",
        "data=text_files",
        f"data.source.train_files={learnable_text}",
        "data.source.val_fraction=0.1",
        "data.source.test_fraction=0.1",
        "data.block_size=32",
        "data.batch_size=8",
        "data.eval_batch_size=5",  # several batches, the last one smaller: the mean must weight by tokens
        f"tokenizer={tokenizer}",
    ]
    if tokenizer == "bpe":
        overrides.append("tokenizer.vocab_size=300")
    cfg = make_cfg(overrides)
    torch.manual_seed(0)
    dm = build_datamodule(cfg)
    task = build_task(cfg, dm)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    val_metrics = trainer.validate(task, datamodule=dm, verbose=False)[0]
    test_metrics = trainer.test(task, datamodule=dm, verbose=False)[0]

    text = learnable_text.read_text(encoding="utf-8")
    splits = carve_splits(text, 0.1, 0.1)
    for stage, split, metrics, loader in [
        ("val", "validation", val_metrics, dm.val_dataloader()),
        ("test", "test", test_metrics, dm.test_dataloader()),
    ]:
        batches = list(loader)
        assert len(batches) >= 3 and batches[-1][1].size(0) < batches[0][1].size(0)
        mean_loss, n_tokens = _independent_loss(task, batches)
        assert n_tokens == sum(y.numel() for _, y in batches)
        assert metrics[f"{stage}/loss"] == pytest.approx(mean_loss, rel=1e-5)
        assert metrics[f"{stage}/ppl"] == pytest.approx(math.exp(mean_loss), rel=1e-5)

        split_tokens = len(dm.tokenizer.encode(splits[split]))
        chars_per_token = len(splits[split]) / split_tokens
        if tokenizer == "char":
            assert chars_per_token == 1.0
        else:
            assert chars_per_token > 1.5  # words and merges span several characters
        assert metrics[f"{stage}/bpc"] == pytest.approx(mean_loss / math.log(2) / chars_per_token, rel=1e-5)

    # an untrained model is close to uniform over the vocabulary
    assert val_metrics["val/ppl"] > 0.3 * dm.tokenizer.vocab_size
