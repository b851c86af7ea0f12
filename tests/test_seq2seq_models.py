"""Sequence-to-sequence networks: step-by-step decoding gives the teacher-forced logits, also after the
memory and state are reordered row-wise as beam search does; the Transformer's KV cache agrees with
recomputing the prefix; padding changes nothing; each network learns to reverse sequences; bad settings
fail with the config key to fix."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from conftest import toy_seq2seq_folder
from lmlab.errors import ConfigError
from lmlab.inference.decoding import select_rows
from lmlab.models.seq2seq import PretrainedSeq2Seq, RecurrentSeq2Seq, Seq2SeqNetwork, TransformerSeq2Seq

V, PAD, EOS = 12, 0, 1  # ids 2 .. 11 are the tokens to reverse; the end token doubles as the begin token
JOINT = {"src_vocab_size": V, "tgt_vocab_size": V, "src_pad_id": PAD, "tgt_pad_id": PAD, "shared_vocabulary": True}
# two vocabularies: a different size and padding id on each side
SEPARATE = {
    "src_vocab_size": V,
    "tgt_vocab_size": V + 5,
    "src_pad_id": PAD,
    "tgt_pad_id": 3,
    "shared_vocabulary": False,
}
EOS_ID = {"eos_id": EOS}
RNN = {"embedding_dim": 16, "hidden_size": 24, "dropout": 0.1}
TRANSFORMER = {"n_embd": 16, "n_head": 2, "dropout": 0.1, "max_positions": 24}

NETWORKS: dict[str, Callable[[], Seq2SeqNetwork]] = {
    "gru_additive_deep": lambda: RecurrentSeq2Seq(
        **SEPARATE, **RNN, cell="gru", attention="additive", encoder_layers=2, decoder_layers=3, tie_output=False
    ),
    "lstm_multiplicative": lambda: RecurrentSeq2Seq(
        **SEPARATE, **RNN, cell="lstm", attention="multiplicative", encoder_layers=3, decoder_layers=2, tie_output=False
    ),
    "gru_multiplicative_unidirectional_tied_shared": lambda: RecurrentSeq2Seq(
        **JOINT,
        **RNN,
        cell="gru",
        attention="multiplicative",
        encoder_layers=1,
        decoder_layers=1,
        bidirectional=False,
        tie_output=True,
        share_embeddings=True,
    ),
    "lstm_additive_tied": lambda: RecurrentSeq2Seq(
        **SEPARATE, **RNN, cell="lstm", attention="additive", encoder_layers=1, decoder_layers=2, tie_output=True
    ),
    "transformer_sinusoidal": lambda: TransformerSeq2Seq(**SEPARATE, **TRANSFORMER, encoder_layers=2, decoder_layers=2),
    "transformer_learned_tied_shared": lambda: TransformerSeq2Seq(
        **JOINT, **TRANSFORMER, encoder_layers=1, decoder_layers=2, positions="learned", share_embeddings=True
    ),
    "transformer_untied_no_bias": lambda: TransformerSeq2Seq(
        **SEPARATE, **TRANSFORMER, encoder_layers=1, decoder_layers=1, tie_output=False, bias=False
    ),
    # random weights saved as pretrained folders; their tables hold 16 rows, more than the 12 tokens
    "pretrained_t5": lambda: PretrainedSeq2Seq(
        **JOINT, **EOS_ID, name_or_path=str(toy_seq2seq_folder("t5", V + 4, False))
    ),
    "pretrained_bart": lambda: PretrainedSeq2Seq(
        **JOINT, **EOS_ID, name_or_path=str(toy_seq2seq_folder("bart", V + 4, False))
    ),
}
TRANSFORMERS = [name for name in NETWORKS if name.startswith("transformer")]


def _build(name: str) -> Seq2SeqNetwork:
    torch.manual_seed(0)
    return NETWORKS[name]().eval()


def _random_batch(net: Seq2SeqNetwork, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four right-padded sources of different lengths and target inputs ``(4, 6)``."""
    g = torch.Generator().manual_seed(seed)
    src_lengths = torch.tensor([7, 3, 1, 5])
    src = torch.randint(2, V, (4, 7), generator=g)
    src[torch.arange(7)[None, :] >= src_lengths[:, None]] = net.src_pad_id
    tgt_in = torch.randint(2, net.tgt_vocab_size, (4, 6), generator=g)
    tgt_in[:, 0] = EOS
    return src, src_lengths, tgt_in


def _step_logits(
    net: Seq2SeqNetwork, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor, reorder_at: int = -1
) -> torch.Tensor:
    """Logits ``(B, T, V)`` from one ``decode_step`` per target token. At step ``reorder_at`` the memory and
    state are reversed row-wise (as beam search reorders them) and the remaining tokens follow; the logits
    are put back in the original order."""
    memory, state, steps = net.encode(src, src_lengths), None, []
    rows = torch.arange(src.size(0))
    for t in range(tgt_in.size(1)):
        if t == reorder_at:
            rows = rows.flip(0)
            memory, state = select_rows(memory, rows), select_rows(state, rows)
        logits, state = net.decode_step(tgt_in[rows, t], memory, state)
        steps.append(logits[rows.argsort()])
    return torch.stack(steps, dim=1)


# -- decoding agrees with teacher forcing -------------------------------------------------------------
@pytest.mark.parametrize("name", list(NETWORKS))
def test_step_decoding_gives_the_teacher_forced_logits(name: str) -> None:
    net = _build(name)
    src, src_lengths, tgt_in = _random_batch(net)
    with torch.no_grad():
        logits = net(src, src_lengths, tgt_in)
        assert logits.shape == (4, 6, net.tgt_vocab_size)
        torch.testing.assert_close(_step_logits(net, src, src_lengths, tgt_in), logits, atol=1e-5, rtol=0)
        # every tensor of the memory and state has the batch first: reordering rows mid-way changes nothing
        reordered = _step_logits(net, src, src_lengths, tgt_in, reorder_at=3)
        torch.testing.assert_close(reordered, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_kv_cache_agrees_with_recomputing_the_prefix(name: str) -> None:
    net = _build(name)
    src, src_lengths, tgt_in = _random_batch(net, seed=1)
    with torch.no_grad():
        cached = _step_logits(net, src, src_lengths, tgt_in)
        net.use_cache = False
        recomputed = _step_logits(net, src, src_lengths, tgt_in)
        _, prefix = net.decode_step(tgt_in[:, 0], net.encode(src, src_lengths), None)
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=0)
    assert torch.equal(prefix, tgt_in[:, :1]), "without the cache the state is the prefix's tokens"


@pytest.mark.parametrize("name", list(NETWORKS))
def test_logits_do_not_depend_on_padding(name: str) -> None:
    net = _build(name)
    src, src_lengths, tgt_in = _random_batch(net, seed=2)
    longer_src, longer_tgt = torch.arange(12) % (V - 2) + 2, torch.arange(10) % (V - 2) + 2
    with torch.no_grad():
        for i in range(src.size(0)):
            n = int(src_lengths[i])
            alone = net(src[i : i + 1, :n], src_lengths[i : i + 1], tgt_in[i : i + 1])
            batch_src = torch.full((2, 12), net.src_pad_id)
            batch_src[0, :n], batch_src[1] = src[i, :n], longer_src
            batch_tgt = torch.full((2, 10), net.tgt_pad_id)
            batch_tgt[0, :6], batch_tgt[1] = tgt_in[i], longer_tgt
            together = net(batch_src, torch.tensor([n, 12]), batch_tgt)
            torch.testing.assert_close(together[0, :6], alone[0], atol=1e-5, rtol=0, msg=f"sentence {i}")


@pytest.mark.parametrize(
    ("name", "projection"), [("lstm_multiplicative", "attention.key"), ("transformer_sinusoidal", "cross.kv")]
)
def test_memory_is_projected_once_per_sentence(name: str, projection: str) -> None:
    net = _build(name)
    calls = []
    for module_name, module in net.named_modules():
        if module_name.endswith(projection):
            module.register_forward_hook(lambda *args: calls.append(1))
    src, src_lengths, tgt_in = _random_batch(net)
    with torch.no_grad():
        memory = net.encode(src, src_lengths)
        projections = len(calls)
        state = None
        for t in range(tgt_in.size(1)):
            _, state = net.decode_step(tgt_in[:, t], memory, state)
    assert projections >= 1 and len(calls) == projections, "decoding steps reuse the memory's projections"


def test_tied_and_shared_weights_and_target_positions() -> None:
    shared = _build("transformer_learned_tied_shared")
    assert shared.src_embedding is shared.tgt_embedding and shared.head.weight is shared.tgt_embedding.weight
    untied = _build("transformer_untied_no_bias")
    assert untied.src_embedding is not untied.tgt_embedding and untied.head.weight is not untied.tgt_embedding.weight
    rnn = _build("lstm_additive_tied")
    assert rnn.head.weight is rnn.tgt_embedding.weight and rnn.src_embedding is not rnn.tgt_embedding
    assert rnn.attentional_size == RNN["embedding_dim"] != RNN["hidden_size"]
    assert rnn.max_target_positions is None
    assert shared.max_target_positions == untied.max_target_positions == TRANSFORMER["max_positions"]
    too_long = torch.full((1, 25), EOS)
    with pytest.raises(ValueError, match=r"model\.max_positions \(24\)"):
        shared(too_long[:, :3], torch.tensor([3]), too_long)


def test_pretrained_network_starts_in_train_mode_and_cuts_logits_to_the_tokenizer() -> None:
    net = NETWORKS["pretrained_bart"]()
    assert all(module.training for module in net.modules()), "from_pretrained's eval mode would drop dropout"
    assert net.model.get_output_embeddings().weight.size(0) == V + 4 and net.tgt_vocab_size == V
    assert net.max_target_positions == 64 and net.start_id == EOS
    assert NETWORKS["pretrained_t5"]().max_target_positions is None  # relative positions: no limit


# -- learning -----------------------------------------------------------------------------------------
def reversal_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random sequences of 3 .. 8 tokens then the end token, and their reversal as target input and output."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=g)
    src, tgt_in, tgt_out = (torch.full((n, 9), PAD) for _ in range(3))
    for i, length in enumerate(lengths.tolist()):
        tokens = torch.randint(2, V, (length,), generator=g)
        src[i, : length + 1] = torch.cat([tokens, torch.tensor([EOS])])
        tgt_in[i, : length + 1] = torch.cat([torch.tensor([EOS]), tokens.flip(0)])
        tgt_out[i, : length + 1] = torch.cat([tokens.flip(0), torch.tensor([EOS])])
    return src, lengths + 1, tgt_in, tgt_out


def greedy(net: Seq2SeqNetwork, src: torch.Tensor, src_lengths: torch.Tensor, max_length: int) -> list[list[int]]:
    """The argmax token at each step until the end token."""
    memory, state = net.encode(src, src_lengths), None
    tokens, out = torch.full((src.size(0),), EOS), []
    for _ in range(max_length):
        logits, state = net.decode_step(tokens, memory, state)
        tokens = logits.argmax(-1)
        out.append(tokens)
    return [row[: row.index(EOS)] if EOS in row else row for row in torch.stack(out, dim=1).tolist()]


SMALL_RNN = {"embedding_dim": 32, "hidden_size": 64, "encoder_layers": 1, "decoder_layers": 1, "dropout": 0.0}
SMALL_TRANSFORMER = {"n_embd": 32, "n_head": 4, "encoder_layers": 2, "decoder_layers": 2, "dropout": 0.0}
# a network, its Adam steps and learning rate (each learns the task from any of several seeds, not just this one)
LEARNERS = {
    "gru_additive": (
        lambda: RecurrentSeq2Seq(**JOINT, **SMALL_RNN, cell="gru", attention="additive", tie_output=False),
        200,
        3e-3,
    ),
    "lstm_multiplicative": (
        lambda: RecurrentSeq2Seq(**JOINT, **SMALL_RNN, cell="lstm", attention="multiplicative", tie_output=False),
        200,
        3e-3,
    ),
    "transformer": (lambda: TransformerSeq2Seq(**JOINT, **SMALL_TRANSFORMER, max_positions=16), 400, 1e-3),
    "pretrained_t5": (
        lambda: PretrainedSeq2Seq(**JOINT, **EOS_ID, name_or_path=str(toy_seq2seq_folder("t5", V + 4, False))),
        600,  # its start is the saved toy weights, whatever the seed: 400 steps gave 78% on some CPUs
        1e-3,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LEARNERS))
def test_network_learns_to_reverse_sequences(name: str) -> None:
    build, steps, lr = LEARNERS[name]
    torch.manual_seed(0)
    net = build()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for step in range(steps):
        src, src_lengths, tgt_in, tgt_out = reversal_batch(64, seed=step)
        logits = net(src, src_lengths, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, V), tgt_out.reshape(-1), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    src, src_lengths, tgt_in, tgt_out = reversal_batch(200, seed=10**6)
    with torch.no_grad():
        predicted = net(src, src_lengths, tgt_in).argmax(-1)
        decoded = greedy(net, src, src_lengths, max_length=12)
    real = tgt_out != PAD
    accuracy = float((predicted[real] == tgt_out[real]).float().mean())
    assert accuracy >= 0.95, f"teacher-forced token accuracy {accuracy:.3f}"
    expected = [row[: row.index(EOS)] for row in tgt_out.tolist()]
    exact = sum(d == e for d, e in zip(decoded, expected, strict=True)) / len(expected)
    assert exact >= 0.8, f"greedy decoding reversed only {exact:.0%} of the held-out sequences"


# -- bad settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: RecurrentSeq2Seq(**SEPARATE, cell="lstm", attention="multiplicative", share_embeddings=True),
            r"model\.share_embeddings=true needs one vocabulary .* data\.joint_vocabulary=true",
        ),
        (
            lambda: TransformerSeq2Seq(**SEPARATE, n_embd=16, n_head=2, share_embeddings=True),
            r"model\.share_embeddings=true .* data\.joint_vocabulary=true",
        ),
        (
            lambda: RecurrentSeq2Seq(**JOINT, cell="rnn", attention="multiplicative"),
            r"model\.cell must be one of lstm, gru, got 'rnn'",
        ),
        (
            lambda: RecurrentSeq2Seq(**JOINT, cell="lstm", attention="dot"),
            r"model\.attention must be one of additive, multiplicative, got 'dot'",
        ),
        (
            lambda: TransformerSeq2Seq(**JOINT, positions="rotary"),
            r"model\.positions must be one of learned, sinusoidal, rope, got 'rotary'",
        ),
        (lambda: TransformerSeq2Seq(**JOINT, n_embd=30, n_head=4), r"model\.n_embd \(30\) must be divisible"),
        (
            lambda: PretrainedSeq2Seq(**SEPARATE, **EOS_ID, name_or_path=str(toy_seq2seq_folder("t5", V + 4, False))),
            r"one vocabulary, but the data has two\. Use the model's own tokenizer: tokenizer=pretrained",
        ),
        (
            lambda: PretrainedSeq2Seq(**JOINT, **EOS_ID, name_or_path=str(toy_seq2seq_folder("t5", V - 2, False))),
            r"The tokenizer has 12 tokens but '.*' embeds only 10\. Use the model's own tokenizer",
        ),
        (
            lambda: PretrainedSeq2Seq(**JOINT, eos_id=3, name_or_path=str(toy_seq2seq_folder("bart", V, False))),
            r"end token has id 3 but '.*' ends sentences with id 1\. .*tokenizer\.name_or_path=",
        ),
        (
            lambda: PretrainedSeq2Seq(**JOINT, **EOS_ID, name_or_path="/no/such/folder"),
            r"model\.name_or_path: no folder at '/no/such/folder'",
        ),
    ],
)
def test_bad_settings_name_the_key_to_fix(build: Callable[[], Seq2SeqNetwork], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()
