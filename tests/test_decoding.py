"""Greedy decoding and beam search for sequence-to-sequence networks, on small fake networks that
implement ``encode`` / ``decode_step`` with batch-first memory and state."""

from __future__ import annotations

import functools
import itertools
import math
from collections import namedtuple

import pytest
import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.inference.decoding import beam_search, greedy_decode, max_target_lengths, select_rows
from lmlab.tasks.translation import Decoding

PAD, BOS, EOS, JUNK = 0, 1, 2, 3
VOCAB = 10


# -- fake networks ---------------------------------------------------------------------------------
class CopyNet(nn.Module):
    """Strongly predicts the next source token, then the end token, then junk forever.

    The prediction depends only on the position, so a decoder that ignored the end token or kept
    reading the outputs of finished rows would return junk. Memory and state hold non-tensor leaves.
    """

    def __init__(self, max_target_positions: int | None = None) -> None:
        super().__init__()
        self.max_target_positions = max_target_positions
        self.calls = 0

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> dict:
        return {"src": src, "lengths": src_lengths, "meta": (7, None)}

    def decode_step(self, tokens: torch.Tensor, memory: dict, state: tuple | None) -> tuple[torch.Tensor, tuple]:
        self.calls += 1
        pos = torch.zeros_like(tokens) if state is None else state[0]
        src, lengths = memory["src"], memory["lengths"]
        assert memory["meta"] == (7, None) and (state is None or state[1] == "tag")
        assert src.size(0) == tokens.size(0)
        from_src = src.gather(1, pos.clamp(max=src.size(1) - 1).unsqueeze(1)).squeeze(1)
        after = torch.where(pos == lengths, torch.full_like(pos, EOS), torch.full_like(pos, JUNK))
        target = torch.where(pos < lengths, from_src, after)
        logits = torch.zeros(tokens.size(0), VOCAB)
        logits[:, EOS] = -10.0  # the end token is unlikely anywhere but at the end
        logits.scatter_(1, target.unsqueeze(1), 10.0)
        return logits, (pos + 1, "tag")


class TinyGRUNet(nn.Module):
    """Random-weight attention GRU decoder over a bag of source embeddings: realistic, unpredictable."""

    def __init__(self, seed: int, vocab: int = 12, hidden: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.src_emb = nn.Embedding(vocab, hidden)
        self.tgt_emb = nn.Embedding(vocab, hidden)
        self.cell = nn.GRUCell(2 * hidden, hidden)
        self.out = nn.Linear(hidden, vocab)
        with torch.no_grad():
            self.out.weight.mul_(3.0)  # peaky enough for varied choices and endings

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> tuple:
        mask = torch.arange(src.size(1)) < src_lengths.unsqueeze(1)
        emb = self.src_emb(src) * mask.unsqueeze(-1)
        pooled = emb.sum(1) / src_lengths.unsqueeze(1)
        return emb, mask, {"pooled": pooled, "layers": 1}

    def decode_step(self, tokens: torch.Tensor, memory: tuple, state: dict | None) -> tuple[torch.Tensor, dict]:
        emb, mask, extra = memory
        h = torch.tanh(extra["pooled"]) if state is None else state["h"]
        attn = (emb @ h.unsqueeze(-1)).squeeze(-1).masked_fill(~mask, float("-inf")).softmax(-1)
        context = (attn.unsqueeze(-1) * emb).sum(1)
        h = self.cell(torch.cat([self.tgt_emb(tokens), context], dim=-1), h)
        return self.out(h), {"h": h, "step": None}


T_BOS, T_EOS, T_A, T_B, T_C = 0, 1, 2, 3, 4
T_VOCAB = 5
# Transition tables over a tiny vocabulary (the source is ignored); unlisted tokens get 0.01.
TABLES = {
    # Greedy takes A (0.55) and then ends ("A <end>"), while the best raw sum is "B <end>" (B is only
    # 0.4) and the best per-token score is "A C C C C", which runs into a max length of 5.
    "greedy_trap": {
        T_BOS: {T_A: 0.55, T_B: 0.4},
        T_A: {T_EOS: 0.34, T_A: 0.33, T_C: 0.31},
        T_B: {T_EOS: 0.6, T_C: 0.38},
        T_C: {T_C: 0.9, T_EOS: 0.06},
        T_EOS: {T_EOS: 1.0},
    },
    # "A <end>" and "B <end>" finish at step 2; the live "A C" (-2.3) looks hopeless at length 3
    # (-0.77 per token) but "A C C C C C", nearly free after C, averages -0.42 and wins.
    "bound_trap": {
        T_BOS: {T_A: 0.5, T_B: 0.45},
        T_A: {T_EOS: 0.6, T_C: 0.2},
        T_B: {T_EOS: 0.6, T_C: 0.2},
        T_C: {T_C: 0.95},
        T_EOS: {T_EOS: 1.0},
    },
}


@functools.cache
def _table_log_probs(name: str) -> torch.Tensor:
    probs = torch.full((T_VOCAB, T_VOCAB), 0.01, dtype=torch.float64)
    for prev, row in TABLES[name].items():
        for tok, p in row.items():
            probs[prev, tok] = p
    return (probs / probs.sum(-1, keepdim=True)).log()


class TableNet(nn.Module):
    """Next-token log-probabilities given by a fixed table indexed by the previous token."""

    def __init__(self, name: str = "greedy_trap", with_vocab_size: bool = False) -> None:
        super().__init__()
        self.register_buffer("table", _table_log_probs(name).float())
        if with_vocab_size:
            self.tgt_vocab_size = T_VOCAB
        self.calls = 0
        self.encoded = False

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> torch.Tensor:
        self.encoded = True
        return src_lengths.unsqueeze(1)

    def decode_step(self, tokens: torch.Tensor, memory: torch.Tensor, state: torch.Tensor | None):
        self.calls += 1
        return self.table[tokens], tokens.clone()


class EndNowNet(nn.Module):
    """Ends every sentence at once."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> torch.Tensor:
        return src

    def decode_step(self, tokens: torch.Tensor, memory: torch.Tensor, state: None):
        self.calls += 1
        logits = torch.zeros(tokens.size(0), VOCAB)
        logits[:, EOS] = 20.0
        return logits, None


# -- helpers ---------------------------------------------------------------------------------------
def _padded(sentences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sentences])
    src = torch.full((len(sentences), int(lengths.max())), PAD)
    for i, s in enumerate(sentences):
        src[i, : len(s)] = torch.tensor(s)
    return src, lengths


def _random_sources(n: int, seed: int, vocab: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (n,), generator=g).tolist()
    return [torch.randint(JUNK, vocab, (n_tok,), generator=g).tolist() for n_tok in lengths]


def _table_score(tokens: list[int], max_length: int, length_penalty: float, name: str = "greedy_trap") -> float:
    """Normalized score of a returned sentence: it ended with the end token unless it hit max_length."""
    table = _table_log_probs(name).tolist()
    seq = tokens if len(tokens) == max_length else [*tokens, T_EOS]
    total = sum(table[prev][tok] for prev, tok in zip([T_BOS, *seq], seq, strict=False))
    return total / len(seq) ** length_penalty


def _brute_force_best(max_length: int, length_penalty: float, name: str = "greedy_trap") -> tuple[float, list[int]]:
    """The best complete sentence: ends with the end token, or has max_length tokens and no end token."""
    best: tuple[float, list[int]] = (-math.inf, [])
    for n in range(1, max_length + 1):
        for seq in itertools.product(range(T_VOCAB), repeat=n):
            if T_EOS in seq[:-1] or (seq[-1] != T_EOS and n < max_length):
                continue
            tokens = list(seq[:-1]) if seq[-1] == T_EOS else list(seq)
            best = max(best, (_table_score(tokens, max_length, length_penalty, name), tokens))
    return best


def _table_src(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((batch, 3), 7), torch.full((batch,), 3)


# -- select_rows and max_target_lengths ------------------------------------------------------------
Pair = namedtuple("Pair", ["x", "n"])


def test_select_rows_keeps_containers_and_non_tensor_leaves() -> None:
    a, b, c = torch.arange(4), torch.arange(8).view(4, 2), torch.arange(4.0)
    tree = ({"a": a, "b": [b, 3]}, None, 7, Pair(c, 2))
    out = select_rows(tree, torch.tensor([2, 0, 0]))
    assert type(out) is tuple and type(out[0]) is dict and type(out[0]["b"]) is list and type(out[3]) is Pair
    assert out[0]["a"].tolist() == [2, 0, 0]
    assert out[0]["b"][0].tolist() == [[4, 5], [0, 1], [0, 1]]
    assert out[0]["b"][1] == 3 and out[1] is None and out[2] == 7 and out[3].n == 2
    assert out[3].x.tolist() == [2.0, 0.0, 0.0]
    assert a.tolist() == [0, 1, 2, 3]  # the input is not modified


def test_max_target_lengths_floor_offset_cap() -> None:
    src_lengths = torch.tensor([0, 3, 10, 100])
    assert max_target_lengths(src_lengths, 1.2, 2).tolist() == [2, 5, 14, 122]
    assert max_target_lengths(src_lengths, 1.2, 2, cap=50).tolist() == [2, 5, 14, 50]
    assert max_target_lengths(torch.tensor([100]), 0.29, 0).tolist() == [29]  # not 28 from rounding
    assert max_target_lengths(torch.tensor([1, 4]), 0.5, -3).tolist() == [1, 1]  # room for the end token


# -- both decoders on the copy network -------------------------------------------------------------
SOURCES = [[4, 5, 6, 7, 8], [9], [5, 5, 4], [8, 7, 6, 5, 4, 9, 9]]


def _decode(method: str, net: nn.Module, src: torch.Tensor, lengths: torch.Tensor, max_lengths, **kw):
    if method == "greedy":
        return greedy_decode(net, src, lengths, BOS, EOS, max_lengths)
    return beam_search(net, src, lengths, BOS, EOS, max_lengths, kw.pop("beam_size", 3), **kw)


@pytest.mark.parametrize(
    ("method", "kw"),
    [("greedy", {}), ("beam", {"beam_size": 1}), ("beam", {"beam_size": 3}), ("beam", {"early_stopping": False})],
)
def test_copy_net_reproduces_every_source_of_a_padded_batch(method: str, kw: dict) -> None:
    net = CopyNet()
    src, lengths = _padded(SOURCES)
    assert _decode(method, net, src, lengths, torch.full((4,), 20), **kw) == SOURCES
    if method == "greedy":
        assert net.calls == max(len(s) for s in SOURCES) + 1  # stops once every row has ended


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_max_length_is_respected(method: str) -> None:
    src, lengths = _padded([SOURCES[3]] * 4)  # 7 tokens each
    out = _decode(method, CopyNet(), src, lengths, torch.tensor([3, 1, 7, 8]))
    assert out == [SOURCES[3][:3], SOURCES[3][:1], SOURCES[3], SOURCES[3]]  # 7: no room for the end token


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_max_target_positions_caps_the_length(method: str) -> None:
    net = CopyNet(max_target_positions=4)  # begin token + 3 generated tokens
    src, lengths = _padded(SOURCES)
    out = _decode(method, net, src, lengths, torch.full((4,), 20))
    assert out == [s[:3] for s in SOURCES]
    assert net.calls == 3


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_max_length_zero_generates_nothing(method: str) -> None:
    src, lengths = _padded(SOURCES[:2])
    assert _decode(method, CopyNet(), src, lengths, torch.tensor([0, 2])) == [[], SOURCES[1]]


def test_immediate_end_stops_after_the_first_step() -> None:
    src, lengths = _padded(SOURCES)
    max_lengths = torch.full((4,), 30)
    net = EndNowNet()
    assert greedy_decode(net, src, lengths, BOS, EOS, max_lengths) == [[]] * 4
    assert net.calls == 1
    net = EndNowNet()
    assert beam_search(net, src, lengths, BOS, EOS, max_lengths, beam_size=1) == [[]] * 4
    assert net.calls == 1
    # K > 1: the first step only yields one finished hypothesis per sentence, the second yields the rest
    net = EndNowNet()
    assert beam_search(net, src, lengths, BOS, EOS, max_lengths, beam_size=3) == [[]] * 4
    assert net.calls == 2


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_empty_batch(method: str) -> None:
    src = torch.zeros((0, 5), dtype=torch.long)
    lengths = torch.zeros(0, dtype=torch.long)
    net = CopyNet()
    assert _decode(method, net, src, lengths, lengths) == []
    assert net.calls == 0


# -- random GRU networks ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 4])
def test_beam_size_one_equals_greedy(seed: int) -> None:
    net = TinyGRUNet(seed).eval()
    sources = _random_sources(8, seed)
    src, lengths = _padded(sources)
    max_lengths = max_target_lengths(lengths, 1.5, 2)
    greedy = greedy_decode(net, src, lengths, BOS, EOS, max_lengths)
    assert beam_search(net, src, lengths, BOS, EOS, max_lengths, beam_size=1) == greedy
    # without early stopping a live beam may still beat a finished one, unless the score is a raw sum
    assert beam_search(net, src, lengths, BOS, EOS, max_lengths, 1, 0.0, early_stopping=False) == greedy
    # not a trivial case: some sentences end early, some run into their max length
    assert any(len(g) < int(m) - 1 for g, m in zip(greedy, max_lengths, strict=True))
    assert any(len(g) == int(m) for g, m in zip(greedy, max_lengths, strict=True))


@pytest.mark.parametrize(("beam_size", "early_stopping"), [(None, True), (3, True), (4, False)])
def test_a_sentence_decodes_the_same_alone_and_in_a_batch(beam_size: int | None, early_stopping: bool) -> None:
    net = TinyGRUNet(5).eval()
    sources = _random_sources(6, seed=11)
    src, lengths = _padded(sources)
    max_lengths = torch.tensor([3, 12, 6, 9, 1, 10])

    def run(src: torch.Tensor, lengths: torch.Tensor, max_lengths: torch.Tensor) -> list[list[int]]:
        if beam_size is None:
            return greedy_decode(net, src, lengths, BOS, EOS, max_lengths)
        return beam_search(net, src, lengths, BOS, EOS, max_lengths, beam_size, early_stopping=early_stopping)

    batched = run(src, lengths, max_lengths)
    alone = [run(*_padded([s]), max_lengths[i : i + 1])[0] for i, s in enumerate(sources)]
    assert batched == alone
    assert len(batched[4]) <= 1


# -- the transition table: beam search finds what greedy misses ------------------------------------
@pytest.mark.parametrize(
    ("length_penalty", "early_stopping", "beam_size"),
    [(0.0, True, 2), (0.0, False, 2), (1.0, False, 2), (1.0, False, 5), (0.0, True, 5)],
)
def test_beam_finds_the_brute_force_best_that_greedy_misses(
    length_penalty: float, early_stopping: bool, beam_size: int
) -> None:
    max_length = 5
    src, lengths = _table_src(2)
    max_lengths = torch.full((2,), max_length)
    best_score, best_tokens = _brute_force_best(max_length, length_penalty)
    greedy = greedy_decode(TableNet(), src, lengths, T_BOS, T_EOS, max_lengths)
    beam = beam_search(TableNet(), src, lengths, T_BOS, T_EOS, max_lengths, beam_size, length_penalty, early_stopping)
    assert beam == [best_tokens, best_tokens]
    assert _table_score(beam[0], max_length, length_penalty) == pytest.approx(best_score)
    assert greedy == [[T_A], [T_A]]
    assert _table_score(greedy[0], max_length, length_penalty) < best_score - 0.1


def test_length_penalty_changes_the_best_sentence() -> None:
    src, lengths = _table_src(1)
    max_lengths = torch.tensor([5])
    raw = beam_search(TableNet(), src, lengths, T_BOS, T_EOS, max_lengths, 2, 0.0)
    per_token = beam_search(TableNet(), src, lengths, T_BOS, T_EOS, max_lengths, 2, 1.0, early_stopping=False)
    assert raw == [[T_B]]
    assert per_token == [[T_A, T_C, T_C, T_C, T_C]]  # finished at the max length without an end token


def test_early_stopping_stops_at_k_finished_and_the_bound_keeps_searching() -> None:
    """With length_penalty=1 a long sentence wins, which early stopping gives up on."""
    src, lengths = _table_src(1)
    max_lengths = torch.tensor([5])
    early_net, bound_net = TableNet(), TableNet()
    early = beam_search(early_net, src, lengths, T_BOS, T_EOS, max_lengths, 2, 1.0, early_stopping=True)
    bounded = beam_search(bound_net, src, lengths, T_BOS, T_EOS, max_lengths, 2, 1.0, early_stopping=False)
    assert _table_score(bounded[0], 5, 1.0) > _table_score(early[0], 5, 1.0)
    assert early == [[T_B]]  # "B <end>" and "A <end>" both finish at step 2
    assert early_net.calls == 2 and bound_net.calls == 5


def test_early_stopping_false_bounds_live_beams_at_the_max_length() -> None:
    """A live beam's best reachable score is at the max length (length_penalty > 0), not the next step."""
    src, lengths = _table_src(1)
    best_score, best_tokens = _brute_force_best(6, 1.0, "bound_trap")
    assert best_tokens == [T_A, T_C, T_C, T_C, T_C, T_C]
    out = beam_search(TableNet("bound_trap"), src, lengths, T_BOS, T_EOS, torch.tensor([6]), 2, 1.0, False)
    assert out == [best_tokens]
    early = beam_search(TableNet("bound_trap"), src, lengths, T_BOS, T_EOS, torch.tensor([6]), 2, 1.0, True)
    assert early == [[T_A]]


def test_early_stopping_false_stops_once_no_live_beam_can_win() -> None:
    """Under a raw sum (length_penalty=0) the finished hypotheses soon beat every live beam."""
    src, lengths = _table_src(1)
    net = TableNet()
    out = beam_search(net, src, lengths, T_BOS, T_EOS, torch.tensor([40]), 2, 0.0, early_stopping=False)
    assert out == [[T_B]]
    assert net.calls == 2  # the live "A A" (-1.71) cannot beat the worse finished "A <end>" (-1.68)


def test_done_sentence_is_not_changed_by_a_longer_neighbour() -> None:
    """Sentence 0 is done early; its rows keep stepping with sentence 1 but must not add hypotheses."""
    src, lengths = _table_src(2)
    kw = {"beam_size": 2, "length_penalty": 1.0, "early_stopping": True}
    alone = beam_search(TableNet(), src[:1], lengths[:1], T_BOS, T_EOS, torch.tensor([5]), **kw)
    together = beam_search(TableNet(), src, lengths, T_BOS, T_EOS, torch.tensor([5, 9]), **kw)
    assert together[0] == alone[0]
    assert alone == [[T_B]]  # its live beams would reach "A C C C C" at length 5 and win


# -- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_vocab_size", [False, True])
def test_beam_size_larger_than_the_vocabulary_is_a_config_error(with_vocab_size: bool) -> None:
    net = TableNet(with_vocab_size=with_vocab_size)
    src, lengths = _table_src(2)
    with pytest.raises(ConfigError, match=r"beam_size=6.*\(5 tokens\).*at most 5"):
        beam_search(net, src, lengths, T_BOS, T_EOS, torch.full((2,), 5), beam_size=6)
    assert net.encoded is not with_vocab_size  # known up front: fails before any work


@pytest.mark.parametrize("beam_size", [0, -2])
def test_beam_size_below_one_is_a_config_error(beam_size: int) -> None:
    src, lengths = _table_src(2)
    with pytest.raises(ConfigError, match="beam_size must be at least 1"):
        beam_search(TableNet(), src, lengths, T_BOS, T_EOS, torch.full((2,), 5), beam_size=beam_size)
    with pytest.raises(ConfigError, match="beam_size"):
        beam_search(TableNet(), src[:0], lengths[:0], T_BOS, T_EOS, lengths[:0], beam_size=beam_size)


def test_decoding_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"task.module.val_decoding: unknown setting\(s\) \['beam'\]"):
        Decoding.from_config({"beam": 3}, "task.module.val_decoding")
    with pytest.raises(ConfigError, match="beam_size must be at least 1"):
        Decoding.from_config({"beam_size": 0}, "task.module.test_decoding")
