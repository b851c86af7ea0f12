"""Batched greedy decoding and beam search for sequence-to-sequence networks.

A network only has to offer two calls, so any encoder-decoder architecture can plug in:

- ``net.encode(src (B, S), src_lengths (B,)) -> memory``
- ``net.decode_step(tokens (B,), memory, state | None) -> (logits (B, V), new_state)``, fed one target
  token per row; the first call has ``state=None`` and feeds the begin token.

``memory`` and ``state`` are opaque nested containers (tuple, list, dict) whose tensors all have the
batch row as their first dimension, or Hugging Face caches; :func:`select_rows` is the only thing that
looks inside them. An optional ``net.max_target_positions`` caps the target length (the begin token
takes one position) and an optional ``net.tgt_vocab_size`` lets a too-large ``beam_size`` fail before
any work is done.

Lengths count generated tokens with the end token included; returned sentences hold neither the
begin nor the end token.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lmlab.errors import ConfigError

__all__ = ["beam_search", "greedy_decode", "max_target_lengths", "select_rows"]


def select_rows(tree: Any, index: torch.Tensor) -> Any:
    """``tree`` with ``index_select(0, index)`` applied to every tensor, keeping the container types.

    This is how beam search copies the encoder memory to every beam and reorders the decoder state
    after each step without knowing the network's layout. A Hugging Face cache (an object with
    ``reorder_cache``) is reordered in place, so the ``tree`` given is used up. Non-tensor leaves (ints,
    None, strings) are returned as they are.
    """
    if isinstance(tree, torch.Tensor):
        return tree.index_select(0, index)
    if callable(getattr(tree, "reorder_cache", None)):  # a Hugging Face key/value cache: reordered in place
        tree.reorder_cache(index)
        return tree
    if isinstance(tree, dict):
        out = copy.copy(tree)  # keeps OrderedDict / defaultdict and their settings
        for key, value in tree.items():
            out[key] = select_rows(value, index)
        return out
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple: fields are positional
        return type(tree)(*(select_rows(value, index) for value in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(select_rows(value, index) for value in tree)
    return tree


def max_target_lengths(src_lengths: torch.Tensor, ratio: float, offset: int, cap: int | None = None) -> torch.Tensor:
    """Per-sentence budget of generated tokens (end token included): ``floor(ratio * src_len) + offset``.

    The result is at least 1 so every sentence can at least emit its end token, then at most ``cap``
    (a hard limit such as the model's positions, applied last). A tiny epsilon keeps products like
    ``0.29 * 100`` from flooring to one less because of binary rounding.
    """
    lengths = torch.floor(src_lengths.to(torch.float64) * ratio + 1e-9).long() + offset
    lengths = lengths.clamp(min=1)
    if cap is not None:
        lengths = lengths.clamp(max=cap)
    return lengths


def _generation_limits(net: nn.Module, max_lengths: torch.Tensor | int, src: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``max_lengths`` as a ``(B,)`` tensor on ``src``'s device, capped by the network's target positions, and
    the steps the batch needs: the largest limit, 0 for an empty batch."""
    limits = torch.as_tensor(max_lengths, dtype=torch.long, device=src.device).expand(src.size(0))
    positions = getattr(net, "max_target_positions", None)
    if positions is not None:
        limits = limits.clamp(max=max(int(positions) - 1, 0))  # the begin token takes one position
    limits = limits.clamp(min=0)
    return limits, int(limits.max()) if len(limits) else 0


def _check_beam_size(beam_size: int, vocab_size: int | None) -> None:
    """Raise a :class:`ConfigError` for a beam that is empty or wider than the target vocabulary."""
    if beam_size < 1:
        raise ConfigError(f"beam_size must be at least 1, got {beam_size}; use beam_size=1 for greedy-like search.")
    if vocab_size is not None and beam_size > vocab_size:
        raise ConfigError(
            f"beam_size={beam_size} is larger than the target vocabulary size ({vocab_size} tokens), so the beams "
            f"cannot hold distinct hypotheses; set beam_size to at most {vocab_size}."
        )


@torch.no_grad()
def greedy_decode(
    net: nn.Module,
    src: torch.Tensor,
    src_lengths: torch.Tensor,
    bos_id: int,
    eos_id: int,
    max_lengths: torch.Tensor,
) -> list[list[int]]:
    """The argmax token at every step, for a whole batch at once.

    A row stops at its end token or after ``max_lengths[row]`` generated tokens. Rows that are done
    keep being fed the end token (the batch is stepped as a whole) but their outputs are ignored;
    stepping stops as soon as every row is done.
    """
    batch, device = src.size(0), src.device
    limits, steps = _generation_limits(net, max_lengths, src)
    if steps == 0:
        return [[] for _ in range(batch)]

    memory = net.encode(src, src_lengths)
    out = torch.full((batch, steps), eos_id, dtype=torch.long, device=device)
    kept = torch.zeros(batch, dtype=torch.long, device=device)  # tokens before the end token
    done = limits <= 0
    tokens = torch.full((batch,), bos_id, dtype=torch.long, device=device)
    state = None
    for step in range(steps):
        logits, state = net.decode_step(tokens, memory, state)
        tokens = logits.argmax(dim=-1).masked_fill(done, eos_id)
        out[:, step] = tokens
        kept += (~done & (tokens != eos_id)).long()
        done = done | (tokens == eos_id) | (limits <= step + 1)
        if bool(done.all()):
            break
    return [row[:n] for row, n in zip(out.tolist(), kept.tolist(), strict=True)]


@torch.no_grad()
def beam_search(
    net: nn.Module,
    src: torch.Tensor,
    src_lengths: torch.Tensor,
    bos_id: int,
    eos_id: int,
    max_lengths: torch.Tensor,
    beam_size: int,
    length_penalty: float = 1.0,
    early_stopping: bool = True,
) -> list[list[int]]:
    """The best hypothesis of a beam search over ``beam_size`` beams per sentence, batched as B*K rows.

    Scores are summed log-probabilities. Each step takes the top ``2K`` candidates of a sentence, so
    that even if ``K`` of them end, ``K`` live beams remain. An ending candidate ranked among the top
    ``K`` becomes a finished hypothesis scored ``score / length ** length_penalty`` (length counts the
    end token; ``length_penalty=0`` keeps the raw sum). Ending candidates ranked below the top ``K``
    are dropped: ``K`` better candidates exist at the same step, and it makes ``beam_size=1`` equal
    greedy decoding.
    At a sentence's max length its live beams are finished as they are (length = their token count).
    Each sentence keeps its ``K`` best finished hypotheses and is done when:

    - ``early_stopping=True``: it has ``K`` finished hypotheses;
    - ``early_stopping=False``: it has ``K`` finished hypotheses and no live beam can still beat the
      worst of them. Log-probabilities are <= 0, so extending a beam never raises its raw score ``s``;
      the best a live beam can still reach is therefore ``s / L ** length_penalty`` with ``L`` the
      sentence's max length when ``length_penalty > 0`` (a longer hypothesis is divided by more), and
      ``L`` = the next length when ``length_penalty <= 0``;
    - or it reached its max length, or it has no live beam left.

    A done sentence's rows are still stepped with the batch but can no longer add hypotheses.
    """
    _check_beam_size(beam_size, getattr(net, "tgt_vocab_size", None))
    batch, device = src.size(0), src.device
    limits, steps = _generation_limits(net, max_lengths, src)
    if steps == 0:
        return [[] for _ in range(batch)]

    k = beam_size
    neg_inf = float("-inf")
    sentence = torch.arange(batch, device=device)
    memory = select_rows(net.encode(src, src_lengths), sentence.repeat_interleave(k))

    tokens = torch.full((batch * k,), bos_id, dtype=torch.long, device=device)
    # All beams start identical: only the first may expand, or the first step would yield K copies.
    scores = torch.full((batch, k), neg_inf, device=device)
    scores[:, 0] = 0.0
    history = torch.full((batch, k, steps), eos_id, dtype=torch.long, device=device)  # tokens of live beams
    fin_scores = torch.full((batch, k), neg_inf, device=device)  # normalized; -inf marks an empty slot
    fin_tokens = torch.full((batch, k, steps), eos_id, dtype=torch.long, device=device)
    fin_lengths = torch.zeros((batch, k), dtype=torch.long, device=device)  # tokens to return
    done = limits <= 0
    state = None

    for step in range(steps):
        logits, state = net.decode_step(tokens, memory, state)
        vocab = logits.size(-1)
        if step == 0:
            _check_beam_size(k, vocab)
        length = step + 1  # generated tokens of every candidate of this step
        log_probs = logits.float().log_softmax(dim=-1).view(batch, k, vocab)
        n_cand = min(2 * k, k * vocab)
        cand_scores, cand = (scores.unsqueeze(-1) + log_probs).view(batch, k * vocab).topk(n_cand, dim=-1)
        cand_beam, cand_token = cand // vocab, cand % vocab
        usable = cand_scores.isfinite() & ~done.unsqueeze(-1)
        is_eos = cand_token == eos_id
        parent_history = history.gather(1, cand_beam.unsqueeze(-1).expand(-1, -1, steps))

        # The best K candidates that do not end carry on as the live beams.
        live_scores, live_pos = cand_scores.masked_fill(is_eos, neg_inf).topk(k, dim=-1)
        live_beam = cand_beam.gather(1, live_pos)
        history = parent_history.gather(1, live_pos.unsqueeze(-1).expand(-1, -1, steps))
        history[:, :, step] = cand_token.gather(1, live_pos)
        scores = live_scores

        # New finished hypotheses: ending candidates among the top K, and live beams at the max length.
        rank = torch.arange(n_cand, device=device)
        ended = is_eos & usable & (rank < k)
        forced = (limits == length).unsqueeze(-1) & live_scores.isfinite() & ~done.unsqueeze(-1)
        if bool(ended.any() | forced.any()):
            norm = float(length) ** length_penalty
            pool_scores = torch.cat(
                [
                    fin_scores,
                    torch.where(ended, cand_scores / norm, neg_inf),
                    torch.where(forced, live_scores / norm, neg_inf),
                ],
                dim=1,
            )
            pool_tokens = torch.cat([fin_tokens, parent_history, history], dim=1)
            pool_lengths = torch.cat(
                [fin_lengths, torch.full_like(cand_beam, length - 1), torch.full_like(live_beam, length)], dim=1
            )
            fin_scores, keep = pool_scores.topk(k, dim=-1)
            fin_tokens = pool_tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, steps))
            fin_lengths = pool_lengths.gather(1, keep)

        full = fin_scores.isfinite().all(dim=-1)
        if early_stopping:
            settled = full
        else:
            reach = limits if length_penalty > 0 else torch.full_like(limits, length + 1)
            best_reachable = scores.max(dim=-1).values / reach.to(scores.dtype) ** length_penalty
            settled = full & (best_reachable <= fin_scores.min(dim=-1).values)
        done = done | settled | (limits <= length) | ~scores.isfinite().any(dim=-1)
        if bool(done.all()):
            break
        state = select_rows(state, (sentence.unsqueeze(-1) * k + live_beam).view(-1))
        tokens = history[:, :, step].reshape(-1)

    best = fin_scores.argmax(dim=-1)
    best_tokens = fin_tokens[sentence, best].tolist()
    best_lengths = torch.where(fin_scores[sentence, best].isfinite(), fin_lengths[sentence, best], 0).tolist()
    return [row[:n] for row, n in zip(best_tokens, best_lengths, strict=True)]
