"""Networks: output shapes, cached incremental forward == full forward, weight tying, bad settings,
and that the language-modeling task trains each model config (loss falls)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from conftest import FAST
from lmlab.errors import ConfigError
from lmlab.models import GPT, RecurrentLM

# conf/trainer/default.yaml lacks some Trainer keys FAST sets (limit_test_batches, enable_progress_bar,
# enable_model_summary), so plain overrides of them cannot compose; "++" sets a key whether or not
# the config already has it.
FAST_OVERRIDES = [f"++{o}" if o.startswith("trainer.") else o for o in FAST]

VOCAB = 37
CELLS = ["lstm", "gru", "rnn"]


def _gpt(**kwargs) -> GPT:
    torch.manual_seed(0)
    settings = {"vocab_size": VOCAB, "block_size": 24, "n_layer": 2, "n_head": 4, "n_embd": 32, **kwargs}
    return GPT(**settings).eval()


def _rnn(cell: str, **kwargs) -> RecurrentLM:
    torch.manual_seed(0)
    settings = {
        "vocab_size": VOCAB,
        "cell": cell,
        "n_embd": 16,
        "hidden_size": 24,
        "n_layer": 2,
        "dropout": 0.1,
        "tie_weights": False,
        **kwargs,
    }
    return RecurrentLM(**settings).eval()


def _tokens(batch: int = 3, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- shapes ------------------------------------------------------------------------------------
def test_gpt_output_shape_and_state() -> None:
    model = _gpt()
    idx = _tokens()
    logits, state = model(idx)
    assert logits.shape == (3, 12, VOCAB)
    assert state is None
    logits, state = model(idx, return_state=True)
    assert len(state) == 2  # one (key, value) pair per layer
    for k, v in state:
        assert k.shape == v.shape == (3, 4, 12, 8)  # (batch, heads, time, head size)


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_output_shape(cell: str) -> None:
    model = _rnn(cell)
    logits, state = model(_tokens())
    assert logits.shape == (3, 12, VOCAB)
    assert state is None
    _, state = model(_tokens(), return_state=True)
    hidden = state[0] if cell == "lstm" else state
    assert hidden.shape == (2, 3, 24)  # (layers, batch, hidden)


def test_gpt_is_causal() -> None:
    model = _gpt()
    idx = _tokens(batch=1)
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % VOCAB
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_gpt_rejects_sequences_longer_than_block_size() -> None:
    model = _gpt(block_size=8)
    with pytest.raises(ValueError, match="block_size 8"):
        model(_tokens(length=9))
    _, state = model(_tokens(length=8), return_state=True)
    with pytest.raises(ValueError, match="block_size 8"):
        model(_tokens(length=1), state, return_state=True)


# -- incremental forward with cache / hidden state ---------------------------------------------
def test_gpt_kv_cache_incremental_equals_full_forward() -> None:
    model = _gpt()
    idx = _tokens(length=20)
    with torch.no_grad():
        full, _ = model(idx)
        logits, state = model(idx[:, :5], return_state=True)
        torch.testing.assert_close(logits, full[:, :5], atol=1e-5, rtol=0)
        for t in range(5, idx.size(1)):
            logits, state = model(idx[:, t : t + 1], state, return_state=True)
            assert logits.shape == (3, 1, VOCAB)
            assert torch.allclose(logits[:, -1], full[:, t], atol=1e-5)
    assert state[0][0].size(2) == 20


def test_gpt_kv_cache_multi_token_chunks_equal_full_forward() -> None:
    # chunks longer than one token after a prefix use the offset causal mask
    model = _gpt()
    idx = _tokens(length=20)
    with torch.no_grad():
        full, _ = model(idx)
        outs, state = [], None
        for lo, hi in [(0, 5), (5, 9), (9, 10), (10, 17), (17, 20)]:
            logits, state = model(idx[:, lo:hi], state, return_state=True)
            outs.append(logits)
    assert torch.allclose(torch.cat(outs, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_hidden_state_incremental_equals_full_forward(cell: str) -> None:
    model = _rnn(cell)
    idx = _tokens(length=15)
    with torch.no_grad():
        full, _ = model(idx)
        logits, state = model(idx[:, :5], return_state=True)
        assert torch.allclose(logits, full[:, :5], atol=1e-5)
        for t in range(5, idx.size(1)):
            logits, state = model(idx[:, t : t + 1], state, return_state=True)
            assert torch.allclose(logits[:, -1], full[:, t], atol=1e-5)
        # without the state the model forgets the prefix
        fresh, _ = model(idx[:, -1:])
    assert not torch.allclose(fresh[:, -1], full[:, -1], atol=1e-5)


# -- weight tying ----------------------------------------------------------------------------
def test_gpt_weight_tying_shares_tensor() -> None:
    tied = _gpt()
    assert tied.lm_head.weight is tied.wte.weight
    assert tied.lm_head.weight.data_ptr() == tied.wte.weight.data_ptr()
    untied = _gpt(tie_weights=False)
    assert untied.lm_head.weight is not untied.wte.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == VOCAB * 32
    # a gradient step through the head moves the embedding too
    with torch.no_grad():
        tied.lm_head.weight[0, 0] = 123.0
    assert tied.wte.weight[0, 0].item() == 123.0


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_weight_tying_shares_tensor(cell: str) -> None:
    tied = _rnn(cell, n_embd=24, hidden_size=24, tie_weights=True)
    assert tied.head.weight is tied.embed.weight
    untied = _rnn(cell, n_embd=24, hidden_size=24, tie_weights=False)
    assert untied.head.weight is not untied.embed.weight
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == VOCAB * 24


# -- bad settings ------------------------------------------------------------------------------
def test_gpt_n_embd_not_divisible_by_n_head_raises() -> None:
    with pytest.raises(ConfigError) as info:
        GPT(vocab_size=VOCAB, block_size=8, n_layer=1, n_head=3, n_embd=32)
    assert "n_embd (32)" in str(info.value) and "n_head (3)" in str(info.value)


def test_recurrent_tie_weights_needs_equal_sizes() -> None:
    with pytest.raises(ConfigError) as info:
        RecurrentLM(vocab_size=VOCAB, cell="lstm", n_embd=16, hidden_size=24, tie_weights=True)
    assert "16" in str(info.value) and "24" in str(info.value)


def test_recurrent_unknown_cell_raises() -> None:
    with pytest.raises(ConfigError) as info:
        RecurrentLM(vocab_size=VOCAB, cell="transformer")
    assert "transformer" in str(info.value)
    assert all(c in str(info.value) for c in CELLS)


# -- training through the task ----------------------------------------------------------------
def _train_losses(run_dir: Path) -> list[float]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.mark.parametrize("model", ["gpt", "lstm", "gru", "rnn"])
def test_task_training_reduces_loss(model: str, make_cfg, learnable_text: Path, tmp_path: Path) -> None:
    from lmlab.train import train

    run_dir = tmp_path / "run"
    cfg = make_cfg(
        [
            f"model={model}",
            "data=text_files",
            f"data.source.train_files={learnable_text}",
            *FAST_OVERRIDES,
            "tokenizer=char",
            "optimizer.lr=3e-3",
            "scheduler=constant",
            "trainer.max_steps=40",
            "trainer.val_check_interval=20",
            "trainer.log_every_n_steps=1",
            "test=false",
            "callbacks.early_stopping=null",
            "callbacks.samples=null",
            "logger=csv",
        ],
        run_dir=run_dir,
    )
    value = train(cfg)
    losses = _train_losses(run_dir)
    assert len(losses) == 40
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # a fresh model is near uniform over the ~25 characters; these lines are very predictable
    assert first > 2.0
    assert last < 0.5 * first and last < 1.0, f"{model}: loss fell only from {first:.3f} to {last:.3f}"
    assert value is not None and math.isfinite(value)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
