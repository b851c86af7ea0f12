"""Tokenizers: training, exact round trips, saved state, fingerprints, unknown text, pretrained files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab.errors import TokenizerError
from lmlab.tokenizers import (
    CharTokenizer,
    HFTokenizer,
    load_pretrained,
    tokenizer_from_state,
    train_bpe,
    train_char,
    train_word,
)

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
    "Caf\u00e9 na\u00efve \u2014 \u00fcber \u65e5\u672c\u8a9e \U0001f600 tabs\tand  spaces.\n"
) * 5


def _normalize_spaces(text: str) -> str:
    """Runs of spaces and tabs collapse to one space and vanish at line ends; newlines are kept."""
    return "\n".join(" ".join(line.split()) for line in text.split("\n"))


def _all_trained() -> dict[str, object]:
    return {
        "char": train_char([TEXT]),
        "word": train_word([TEXT]),
        "bpe": train_bpe([TEXT], vocab_size=400, min_frequency=2),
    }


# -- training and round trips -----------------------------------------------------------------
def test_char_tokenizer_vocabulary_and_exact_round_trip() -> None:
    tok = train_char([TEXT])
    assert isinstance(tok, CharTokenizer)
    # one id per distinct character, plus the unknown symbol
    assert tok.vocab_size == len(set(TEXT)) + 1
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == TEXT
    # sorted vocabulary: ids follow code point order
    assert [tok.encode(c)[0] for c in sorted(set(TEXT))] == list(range(len(set(TEXT))))


def test_char_tokenizer_without_unk_has_only_seen_characters() -> None:
    tok = train_char(["abcab"], unk=False)
    assert tok.vocab_size == 3
    assert tok.unk_id is None
    with pytest.raises(TokenizerError, match="'z'"):
        tok.encode("abz")  # no unknown symbol: non-strict encoding cannot fall back either


def test_bpe_tokenizer_exact_round_trip_including_unseen_text() -> None:
    tok = train_bpe([TEXT], vocab_size=400, min_frequency=2)
    assert isinstance(tok, HFTokenizer) and tok.kind == "bpe"
    assert tok.vocab_size <= 400
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    # merges compress the text: fewer tokens than bytes
    assert len(ids) < len(TEXT.encode("utf-8"))
    # byte level: text never seen in training still round-trips exactly
    unseen = "Zebras \u00a7 quixotic \u0416\u0416 \U0001f680\n\r\n"
    assert tok.decode(tok.encode(unseen)) == unseen
    assert tok.eos_id == tok.backend.token_to_id("<|endoftext|>")
    assert tok.pad_id == tok.backend.token_to_id("<pad>")


def test_word_tokenizer_round_trip_on_whitespace_normalized_text() -> None:
    text = "the  cat\tsat\n\n  on the mat \nthe dog ran\n" * 3
    tok = train_word([text], split_punctuation=False)
    ids = tok.encode(text)
    assert tok.decode(ids) == _normalize_spaces(text)
    # one token per word and per newline
    assert len(ids) == len(text.split()) + text.count("\n")
    assert tok.unk_id is not None and tok.unk_id not in ids


def test_word_tokenizer_with_punctuation_keeps_every_word() -> None:
    tok = train_word([TEXT])
    decoded = tok.decode(tok.encode(TEXT))
    assert decoded.count("\n") == TEXT.count("\n")
    assert "".join(decoded.split()) == "".join(TEXT.split())
    assert ["First", "Citizen", ":"] == decoded.split("\n")[0].split()


def test_word_tokenizer_maps_unseen_words_to_unk_and_strict_raises() -> None:
    tok = train_word([TEXT])
    ids = tok.encode("zebra speak")
    assert ids[0] == tok.unk_id and ids[1] != tok.unk_id
    with pytest.raises(TokenizerError, match="<unk>"):
        tok.encode("zebra speak", strict=True)
    assert tok.encode("speak", strict=True) == ids[1:]


def test_word_vocab_size_limits_vocabulary() -> None:
    small = train_word([TEXT], vocab_size=10)
    assert small.vocab_size == 10
    assert small.unk_id in small.encode(TEXT)


@pytest.mark.parametrize("kind", ["bpe", "word"])
def test_a_tokenizer_learns_from_the_first_train_max_chars_characters_only(kind: str) -> None:
    first, rest = "ab ab abab\n" * 300, "xyzw xyzw xyzwxyzw\n" * 300
    train = {"bpe": train_bpe, "word": train_word}[kind]
    bounded = train([first, rest], train_max_chars=len(first), min_frequency=1)
    whole = train([first, rest], min_frequency=1)
    assert not any("xyzw" in token for token in bounded.vocabulary()), "nothing of the text past the budget"
    assert any("xyzw" in token for token in whole.vocabulary())
    assert any("ab" in token for token in bounded.vocabulary())


# -- saved state and fingerprints ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_state_round_trip_gives_identical_ids_and_fingerprint(kind: str) -> None:
    tok = _all_trained()[kind]
    state = tok.state()
    restored = tokenizer_from_state(json.loads(json.dumps(state)))  # must survive JSON (checkpoints, cache)
    assert type(restored) is type(tok)
    assert restored.kind == kind
    assert restored.vocab_size == tok.vocab_size
    probe = TEXT + "unseen zebra \u00a7\n"
    assert restored.encode(probe) == tok.encode(probe)
    assert restored.decode(tok.encode(TEXT)) == tok.decode(tok.encode(TEXT))
    assert restored.fingerprint() == tok.fingerprint()
    assert (restored.eos_id, restored.pad_id) == (tok.eos_id, tok.pad_id)


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_fingerprint_changes_when_vocabulary_differs(kind: str) -> None:
    other_text = TEXT + "xyzzy qwerty XYZZY!\n" * 3
    builders = {
        "char": train_char,
        "word": train_word,
        "bpe": lambda texts: train_bpe(texts, vocab_size=400, min_frequency=2),
    }
    a = builders[kind]([TEXT])
    a_again = builders[kind]([TEXT])
    b = builders[kind]([other_text])
    assert a.fingerprint() == a_again.fingerprint()  # training is deterministic
    assert a.fingerprint() != b.fingerprint()
    assert len(a.fingerprint()) == 16


def test_fingerprint_differs_across_kinds_and_settings() -> None:
    prints = {t.fingerprint() for t in _all_trained().values()}
    assert len(prints) == 3
    assert train_char([TEXT], unk=True).fingerprint() != train_char([TEXT], unk=False).fingerprint()
    assert train_bpe([TEXT], vocab_size=300).fingerprint() != train_bpe([TEXT], vocab_size=400).fingerprint()


def test_unknown_kind_in_state_raises() -> None:
    with pytest.raises(TokenizerError, match="sentencepiece"):
        tokenizer_from_state({"kind": "sentencepiece"})


# -- unknown characters -----------------------------------------------------------------------
def test_char_strict_encode_names_unknown_character() -> None:
    tok = train_char(["hello world"])
    with pytest.raises(TokenizerError) as info:
        tok.encode("hello, world", strict=True)
    assert "','" in str(info.value)
    assert "1 character" in str(info.value)


def test_char_strict_encode_lists_several_unknown_characters() -> None:
    tok = train_char(["abc"])
    with pytest.raises(TokenizerError) as info:
        tok.encode("aXbY\u00e9", strict=True)
    message = str(info.value)
    for ch in ("X", "Y", "\u00e9"):
        assert repr(ch) in message
    assert "3 character" in message


def test_char_non_strict_maps_unknown_to_unk() -> None:
    tok = train_char(["hello world"])
    ids = tok.encode("hello, world!")
    assert len(ids) == len("hello, world!")
    assert ids[5] == tok.unk_id and ids[-1] == tok.unk_id
    assert ids.count(tok.unk_id) == 2
    assert tok.decode(ids) == "hello" + CharTokenizer.UNK + " world" + CharTokenizer.UNK
    # strict encoding of representable text is the same as non-strict
    assert tok.encode("hello world", strict=True) == tok.encode("hello world")


# -- pretrained tokenizers from local files ----------------------------------------------------
def test_load_pretrained_missing_local_path_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(TokenizerError) as info:
        load_pretrained(None, name_or_path=str(missing))
    assert str(missing) in str(info.value)


def test_load_pretrained_folder_without_tokenizer_json_names_path(tmp_path: Path) -> None:
    folder = tmp_path / "empty_model"
    folder.mkdir()
    with pytest.raises(TokenizerError) as info:
        load_pretrained(None, name_or_path=str(folder))
    assert str(folder) in str(info.value)


def test_load_pretrained_from_tokenizer_json_file(tmp_path: Path) -> None:
    trained = train_bpe([TEXT], vocab_size=400, min_frequency=2)
    path = tmp_path / "my_tokenizer.json"
    trained.backend.save(str(path))
    tok = load_pretrained(["ignored"], name_or_path=str(path), eos_token="<|endoftext|>", pad_token="<pad>")
    assert tok.kind == "pretrained"
    assert tok.vocab_size == trained.vocab_size
    assert tok.encode(TEXT) == trained.encode(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.eos_id == trained.eos_id and tok.pad_id == trained.pad_id
    restored = tokenizer_from_state(tok.state())
    assert restored.kind == "pretrained" and restored.encode(TEXT) == tok.encode(TEXT)
    assert restored.fingerprint() == tok.fingerprint()


def test_load_pretrained_from_folder_holding_tokenizer_json(tmp_path: Path) -> None:
    trained = train_bpe([TEXT], vocab_size=400, min_frequency=2)
    folder = tmp_path / "saved"
    folder.mkdir()
    trained.backend.save(str(folder / "tokenizer.json"))
    tok = load_pretrained(name_or_path=str(folder))
    assert tok.encode(TEXT) == trained.encode(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.source == str(folder)
    assert tok.eos_id is None  # none asked for


def test_pretrained_fingerprint_ignores_location_but_not_content(tmp_path: Path) -> None:
    trained = train_bpe([TEXT], vocab_size=400, min_frequency=2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    trained.backend.save(str(tmp_path / "a" / "tokenizer.json"))
    trained.backend.save(str(tmp_path / "b" / "tokenizer.json"))
    from_a = load_pretrained(name_or_path=str(tmp_path / "a"))
    from_b = load_pretrained(name_or_path=str(tmp_path / "b" / "tokenizer.json"))
    # the same file moved elsewhere is the same tokenizer (a resumed run must accept it)
    assert from_a.fingerprint() == from_b.fingerprint()
    other = train_bpe([TEXT], vocab_size=300, min_frequency=2)
    other.backend.save(str(tmp_path / "b" / "tokenizer.json"))
    assert load_pretrained(name_or_path=str(tmp_path / "b")).fingerprint() != from_a.fingerprint()
    # special tokens change the ids that mean end-of-text, so they count
    with_eos = load_pretrained(name_or_path=str(tmp_path / "a"), eos_token="<|endoftext|>")
    assert with_eos.fingerprint() != from_a.fingerprint()


def test_load_pretrained_unknown_special_token_raises(tmp_path: Path) -> None:
    trained = train_bpe([TEXT], vocab_size=400, min_frequency=2)
    path = tmp_path / "tokenizer.json"
    trained.backend.save(str(path))
    with pytest.raises(TokenizerError, match="<eos>"):
        load_pretrained(name_or_path=str(path), eos_token="<eos>")
