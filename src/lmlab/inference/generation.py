"""Autoregressive sampling with temperature, top-k and nucleus (top-p) filtering."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest set with probability >= top_p to -inf."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the token that crosses top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids ``(B,)`` from last-position logits ``(B, V)``; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    suppress_ids: list[int] | None = None,
    on_token: Callable[[torch.Tensor], bool] | None = None,
) -> torch.Tensor:
    """Extend ``idx`` ``(B, T)`` by up to ``max_new_tokens``, reusing the model's cache or hidden state.

    For models with a context limit (``block_size``) the cache is rebuilt from the last
    ``block_size`` tokens once it is full. ``suppress_ids`` are never sampled (e.g. an unknown
    symbol that training text never contained). ``on_token`` sees each new token ``(B,)`` as it is chosen
    (to stream it); returning False stops there.
    """
    block_size = getattr(model, "block_size", None)
    context = idx[:, -block_size:] if block_size else idx
    logits, state = model(context, None, return_state=True)
    cached = context.size(1)
    for step in range(max_new_tokens):
        last = logits[:, -1]
        if suppress_ids:
            last = last.index_fill(-1, torch.tensor(suppress_ids, device=last.device), float("-inf"))
        nxt = sample_next(last, temperature, top_k, top_p, generator)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        if on_token is not None and not on_token(nxt):
            break
        if eos_id is not None and bool((nxt == eos_id).all()) or step == max_new_tokens - 1:
            break
        if block_size and cached + 1 > block_size:
            logits, state = model(idx[:, -block_size:], None, return_state=True)
            cached = block_size
        else:
            logits, state = model(nxt[:, None], state, return_state=True)
            cached += 1
    return idx
