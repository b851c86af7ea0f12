"""Sampling: top-k / top-p filtering, temperature, seeded determinism, the sliding context window,
and that cached generation equals recomputing the whole forward pass each step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmlab.inference.generation import filter_logits, generate, sample_next
from lmlab.models import GPT, RecurrentLM

VOCAB = 29


def _gpt(block_size: int = 16) -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=2, n_embd=32).eval()


def _rnn(cell: str = "lstm") -> RecurrentLM:
    torch.manual_seed(0)
    model = RecurrentLM(
        vocab_size=VOCAB, cell=cell, n_embd=16, hidden_size=32, n_layer=2, dropout=0.0, tie_weights=False
    )
    return model.eval()


def _prompt(batch: int = 2, length: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _random_logits(rows: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# -- filter_logits ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 10, 49])
def test_top_k_keeps_exactly_the_k_largest(k: int) -> None:
    logits = _random_logits(4, 50, seed=k)
    out = filter_logits(logits, top_k=k)
    for row_in, row_out in zip(logits.numpy(), out.numpy(), strict=True):
        kept = set(np.flatnonzero(np.isfinite(row_out)))
        assert kept == set(np.argsort(-row_in)[:k])
        # kept logits are unchanged, the rest are -inf
        assert np.array_equal(row_out[sorted(kept)], row_in[sorted(kept)])
        assert np.all(row_out[~np.isfinite(row_out)] == -np.inf)
    assert logits.isfinite().all()  # the input is not modified


@pytest.mark.parametrize("k", [None, 0, 50, 100])
def test_top_k_outside_range_keeps_everything(k: int | None) -> None:
    logits = _random_logits(2, 50, seed=1)
    assert torch.equal(filter_logits(logits, top_k=k), logits)


def _numpy_top_p_keep(row: np.ndarray, p: float) -> set[int]:
    """The smallest set of most probable ids whose probabilities sum to at least p (float64)."""
    probs = np.exp(row.astype(np.float64) - row.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    n_keep = int(np.searchsorted(cum, p) + 1)  # first index where the sum reaches p, inclusive
    # the tested p values stay clear of the cumulative sums, so float32 rounding cannot matter
    assert np.min(np.abs(cum - p)) > 1e-5
    return set(order[:n_keep].tolist())


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.77, 0.9, 0.99])
def test_top_p_keeps_smallest_prefix_reaching_p(p: float) -> None:
    logits = _random_logits(6, 40, seed=int(p * 100))
    out = filter_logits(logits, top_p=p)
    for row_in, row_out in zip(logits.numpy(), out.numpy(), strict=True):
        kept = set(np.flatnonzero(np.isfinite(row_out)).tolist())
        assert kept == _numpy_top_p_keep(row_in, p)
        assert np.array_equal(row_out[sorted(kept)], row_in[sorted(kept)])


def test_top_p_keeps_top_token_when_it_alone_exceeds_p() -> None:
    logits = torch.tensor([[10.0, 0.0, 1.0, -1.0]])
    out = filter_logits(logits, top_p=0.5)
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]


def test_top_k_then_top_p() -> None:
    logits = _random_logits(3, 30, seed=7)
    out = filter_logits(logits, top_k=8, top_p=0.6)
    for row_in, row_out in zip(logits.numpy(), out.numpy(), strict=True):
        top8 = np.argsort(-row_in)[:8]
        restricted = np.full_like(row_in, -np.inf)
        restricted[top8] = row_in[top8]
        kept = set(np.flatnonzero(np.isfinite(row_out)).tolist())
        assert kept == _numpy_top_p_keep(restricted, 0.6)
        assert kept <= set(top8.tolist())


@pytest.mark.parametrize("p", [None, 0.0, 1.0])
def test_top_p_outside_range_keeps_everything(p: float | None) -> None:
    logits = _random_logits(2, 20, seed=2)
    assert torch.equal(filter_logits(logits, top_p=p), logits)


# -- sample_next -----------------------------------------------------------------------------------
def test_temperature_zero_is_argmax() -> None:
    logits = _random_logits(8, 50, seed=3)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=0.0, generator=g), logits.argmax(dim=-1))
    # filters do not matter for greedy decoding
    assert torch.equal(sample_next(logits, temperature=0.0, top_k=5, top_p=0.1), logits.argmax(dim=-1))


def test_top_k_sampling_only_returns_top_k_ids() -> None:
    logits = _random_logits(1, 50, seed=4, scale=0.5).expand(4000, 50).contiguous()
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_k=3, generator=g)
    assert draws.shape == (4000,)
    assert set(draws.tolist()) == top3  # only the top 3, and with flat-ish logits all of them


def test_sampling_frequencies_follow_tempered_probabilities() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4).contiguous()
    g = torch.Generator().manual_seed(1)
    for temperature in (0.5, 2.0):
        draws = sample_next(logits, temperature=temperature, generator=g)
        freq = np.bincount(draws.numpy(), minlength=4) / len(draws)
        expected = torch.softmax(logits[0] / temperature, dim=-1).numpy()
        assert np.allclose(freq, expected, atol=0.02)


def test_sampling_with_seeded_generator_is_reproducible() -> None:
    logits = _random_logits(64, 50, seed=5, scale=0.3)
    a = sample_next(logits, generator=torch.Generator().manual_seed(11))
    b = sample_next(logits, generator=torch.Generator().manual_seed(11))
    c = sample_next(logits, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# -- generate ----------------------------------------------------------------------------------------
def test_generate_same_seed_same_output_different_seeds_differ() -> None:
    model = _gpt()
    prompt = _prompt()

    def run(seed: int) -> torch.Tensor:
        return generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 15)
    assert torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB


def _greedy_without_cache(model: torch.nn.Module, idx: torch.Tensor, steps: int, window: int | None) -> torch.Tensor:
    """Greedy decoding that reruns the whole forward pass (on the last ``window`` tokens) every step."""
    with torch.no_grad():
        for _ in range(steps):
            context = idx[:, -window:] if window else idx
            logits, _ = model(context)
            idx = torch.cat([idx, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return idx


def test_gpt_cached_greedy_generation_equals_full_forward() -> None:
    model = _gpt(block_size=16)
    prompt = _prompt(length=4)
    cached = generate(model, prompt, 12, temperature=0.0)  # stays inside the context window
    assert torch.equal(cached, _greedy_without_cache(model, prompt, 12, window=None))
    assert cached.shape == (2, 16)


def test_gpt_generation_beyond_block_size_slides_window() -> None:
    model = _gpt(block_size=8)
    prompt = _prompt(length=5)
    out = generate(model, prompt, 20, temperature=0.0)
    assert out.shape == (2, 5 + 20)
    assert torch.equal(out[:, :5], prompt)
    assert torch.equal(out, _greedy_without_cache(model, prompt, 20, window=8))


def test_gpt_prompt_longer_than_block_size() -> None:
    model = _gpt(block_size=8)
    prompt = _prompt(length=13)
    out = generate(model, prompt, 6, temperature=0.0)
    assert out.shape == (2, 19)
    assert torch.equal(out, _greedy_without_cache(model, prompt, 6, window=8))


def test_gpt_sampled_generation_beyond_block_size() -> None:
    model = _gpt(block_size=8)
    out = generate(
        model, _prompt(length=3), 30, temperature=1.0, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (2, 33)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_recurrent_cached_greedy_generation_equals_full_forward(cell: str) -> None:
    model = _rnn(cell)
    prompt = _prompt(length=4)
    out = generate(model, prompt, 15, temperature=0.0)
    assert out.shape == (2, 19)
    assert torch.equal(out, _greedy_without_cache(model, prompt, 15, window=None))


def test_generate_stops_when_every_row_emits_eos() -> None:
    model = _gpt()
    prompt = _prompt(batch=1)
    greedy = generate(model, prompt, 10, temperature=0.0)
    eos = int(greedy[0, 7])  # the third generated token
    first_eos = next(i for i in range(5, 15) if int(greedy[0, i]) == eos)
    stopped = generate(model, prompt, 10, temperature=0.0, eos_id=eos)
    assert torch.equal(stopped, greedy[:, : first_eos + 1])


def test_generate_zero_new_tokens_returns_prompt() -> None:
    prompt = _prompt()
    assert torch.equal(generate(_gpt(), prompt, 0), prompt)


def test_suppressed_ids_are_never_sampled() -> None:
    torch.manual_seed(0)
    model = GPT(vocab_size=6, block_size=16, n_layer=1, n_head=1, n_embd=8, tie_weights=False).eval()
    with torch.no_grad():  # final features all ones, so id 3 gets logit 8 and the others 0
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[3] = 1.0
    gen = torch.Generator().manual_seed(0)
    out = generate(model, torch.zeros(4, 1, dtype=torch.long), 30, temperature=1.0, generator=gen, suppress_ids=[3])
    assert 3 not in out[:, 1:].tolist()[0] and not (out[:, 1:] == 3).any()
    greedy = generate(model, torch.zeros(1, 1, dtype=torch.long), 5, temperature=0.0)
    assert (greedy[:, 1:] == 3).all()  # without suppression the same model picks it
