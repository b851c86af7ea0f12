"""Translation through the command-line config: models learn the toy transduction, metrics equal
sacreBLEU's, lmlab-translate equals in-process decoding, and bad input gets the promised errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sacrebleu
import torch

from conftest import (
    Command,
    compose_cfg,
    mt_overrides,
    pretrained_seq2seq_overrides,
    script,
    toy_translation,
    write_pair_splits,
    write_pairs,
)
from lmlab.errors import CheckpointMismatchError, ConfigError
from lmlab.evaluate import evaluate
from lmlab.run.checkpoint import average_checkpoints, load_task
from lmlab.tasks.translation import Decoding
from lmlab.train import train
from lmlab.translate import translate

# one worker runs this module's tests, which share its trained fixtures
pytestmark = pytest.mark.xdist_group("translation")

TINY_TRANSFORMER = [
    "model=transformer_seq2seq",
    "model.n_embd=64",
    "model.n_head=4",
    "model.encoder_layers=2",
    "model.decoder_layers=2",
    "model.dropout=0.0",
]
TINY_RNN = [
    "model.embedding_dim=48",
    "model.hidden_size=64",
    "model.encoder_layers=1",
    "model.decoder_layers=1",
    "model.dropout=0.0",
]
LEARN = ["trainer.max_steps=300", "trainer.val_check_interval=150", "task.module.test_decoding.beam_size=3"]


def _run(make_cfg, overrides: list[str], run_dir: Path) -> dict:
    train(make_cfg(overrides, run_dir=run_dir))
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Transformer trained on the toy task, keeping its two best checkpoints (shared by the decoding,
    entry-point and resume tests). Returns the root folder, with ``pairs/`` and ``run/``."""
    root = tmp_path_factory.mktemp("mt")
    overrides = mt_overrides(
        write_pair_splits(root / "pairs"), *TINY_TRANSFORMER, *LEARN, "callbacks.model_checkpoint.save_top_k=2"
    )
    train(compose_cfg(root, overrides))
    return root


def _best(trained: Path) -> str:
    return json.loads((trained / "run" / "metrics.json").read_text())["best_checkpoint"]


def test_transformer_learns_the_toy_translation(trained: Path) -> None:
    record = json.loads((trained / "run" / "metrics.json").read_text())
    metrics = record["metrics"]
    assert record["optimized_metric"] == "val/bleu" and record["mode"] == "max"
    assert metrics["test/bleu"] > 90 and metrics["test/chrf"] > 90, metrics
    assert metrics["val/loss"] < 0.3
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)


@pytest.mark.parametrize(
    ("model", "attention"),
    [("gru_attention", "additive"), ("gru_attention", "multiplicative"), ("lstm_attention", "multiplicative")],
)
def test_recurrent_models_learn_the_toy_translation(
    make_cfg, pairs_dir: Path, tmp_path: Path, model: str, attention: str
) -> None:
    overrides = mt_overrides(
        pairs_dir, f"model={model}", f"model.attention={attention}", *TINY_RNN, *LEARN, "test=true"
    )
    metrics = _run(make_cfg, overrides, tmp_path / "run")["metrics"]
    assert metrics["test/bleu"] > 90, metrics


def test_logged_bleu_and_chrf_equal_sacrebleu_on_the_decoded_test_set(trained: Path) -> None:
    metrics = json.loads((trained / "run" / "metrics.json").read_text())["metrics"]
    task, _ = load_task(_best(trained))
    rows = [json.loads(line) for line in (trained / "pairs" / "test.jsonl").read_text().splitlines()]
    hypotheses = task.translate([r["en"] for r in rows])
    references = [r["de"] for r in rows]
    assert metrics["test/bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score, abs=1e-3)
    assert metrics["test/chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score, abs=1e-3)


def test_lmlab_translate_equals_in_process_decoding(trained: Path, make_cfg, tmp_path: Path) -> None:
    best = _best(trained)
    sentences = ["red cat", "", "one two three four", "dog blue six five cat"]
    (tmp_path / "in.en").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    for beam in (1, 4):
        lines = translate(
            make_cfg(
                [f"ckpt_path={best}", f"input={tmp_path / 'in.en'}", f"beam_size={beam}", "batch_size=2"],
                config_name="translate",
            )
        )
        task, _ = load_task(best)
        expected = task.translate(sentences, Decoding(beam_size=beam), batch_size=3)
        assert lines == expected and lines[1] == ""
        assert lines[0] == toy_translation("red cat") and lines[2] == toy_translation("one two three four")


def test_beam_size_larger_than_the_vocabulary_is_refused(trained: Path, make_cfg, tmp_path: Path) -> None:
    best = _best(trained)
    (tmp_path / "in.en").write_text("red cat\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="beam_size"):
        translate(
            make_cfg([f"ckpt_path={best}", f"input={tmp_path / 'in.en'}", "beam_size=100000"], config_name="translate")
        )


def test_eval_reproduces_the_test_metrics(trained: Path, make_cfg) -> None:
    record = json.loads((trained / "run" / "metrics.json").read_text())
    metrics = evaluate(make_cfg([f"ckpt_path={record['best_checkpoint']}", "splits=[test]"], config_name="eval"))
    assert metrics["test/bleu"] == pytest.approx(record["metrics"]["test/bleu"], abs=1e-4)


def test_averaged_checkpoint_holds_the_mean_weights(trained: Path, tmp_path: Path) -> None:
    paths = sorted((trained / "run" / "checkpoints").glob("step_*.ckpt"))
    assert len(paths) == 2
    averaged = average_checkpoints(paths)
    weights = [torch.load(p, weights_only=True)["state_dict"] for p in paths]
    for key, value in averaged["state_dict"].items():
        if value.is_floating_point():
            assert torch.allclose(value, (weights[0][key] + weights[1][key]) / 2, atol=1e-6), key
    torch.save(averaged, tmp_path / "avg.ckpt")
    task, _ = load_task(tmp_path / "avg.ckpt")
    assert task.translate(["red cat"])[0]
    with pytest.raises(ConfigError, match="at least two"):
        average_checkpoints(paths[:1])


def test_resuming_with_another_tokenizer_or_language_is_refused(trained: Path, make_cfg, tmp_path: Path) -> None:
    last = trained / "run" / "checkpoints" / "last.ckpt"
    base = mt_overrides(trained / "pairs", *TINY_TRANSFORMER, "trainer.max_steps=310", f"ckpt_path={last}")
    with pytest.raises(CheckpointMismatchError, match="different tokenizer"):
        train(make_cfg([*base, "tokenizer.vocab_size=300"], run_dir=tmp_path / "a"))
    with pytest.raises(CheckpointMismatchError, match="source_lang='en'"):
        train(make_cfg([*base, "data.source_lang=de", "data.target_lang=en"], run_dir=tmp_path / "b"))


# -- a pretrained encoder-decoder ------------------------------------------------------------------------
PREFIX = "translate English to German: "


def _pretrained_overrides(pairs: Path, *extra: str) -> list[str]:
    own_tokenizer = [o for o in mt_overrides(pairs) if not o.startswith("tokenizer.")]
    return [*own_tokenizer, *pretrained_seq2seq_overrides(), *extra]


@pytest.mark.slow
def test_pretrained_seq2seq_fine_tunes_from_a_local_folder(
    make_cfg, pairs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A T5 saved with save_pretrained (random weights) and its own tokenizer, with a task prefix on every source."""
    overrides = _pretrained_overrides(
        pairs_dir, *LEARN, "trainer.max_steps=600", "trainer.val_check_interval=300", f"data.source_prefix='{PREFIX}'"
    )
    record = _run(make_cfg, overrides, tmp_path / "run")
    assert record["metrics"]["test/bleu"] > 90, record["metrics"]
    task, _ = load_task(record["best_checkpoint"])
    assert task.hparams.data_info["source_prefix"] == PREFIX
    # lmlab-translate puts the prefix first too, and matches in-process decoding
    sentences = ["red cat", "one two three four"]
    (tmp_path / "in.en").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    lines = translate(
        make_cfg(
            [f"ckpt_path={record['best_checkpoint']}", f"input={tmp_path / 'in.en'}", "beam_size=3"],
            config_name="translate",
        )
    )
    assert lines == task.translate(sentences, Decoding(beam_size=3)) == [toy_translation(s) for s in sentences]
    without_prefix = task.decode_texts(*_sources(task, sentences, ""), Decoding())
    with_prefix = task.decode_texts(*_sources(task, sentences, PREFIX), Decoding())
    assert with_prefix == lines and without_prefix != with_prefix, "the prefix reaches the model"
    # the checkpoint carries the model's architecture: it loads with the pretrained folder out of reach
    transformers = pytest.importorskip("transformers")

    def unreachable(*args, **kwargs):
        raise OSError("the pretrained folder and the hub are out of reach")

    monkeypatch.setattr(transformers.AutoModelForSeq2SeqLM, "from_pretrained", unreachable)
    offline, _ = load_task(record["best_checkpoint"])
    assert offline.translate(sentences, Decoding(beam_size=3)) == lines


def _sources(task, sentences: list[str], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    from lmlab.data.batching import pad_batch
    from lmlab.data.translation import encode_sources

    ids, _ = encode_sources(task.tokenizer, sentences, 24, prefix)
    return pad_batch(ids, task.tokenizer.source.pad_id)


def test_pretrained_seq2seq_refuses_another_tokenizer(make_cfg, pairs_dir: Path) -> None:
    overrides = [o for o in _pretrained_overrides(pairs_dir) if not o.startswith("tokenizer")]
    own = r"Use the model's own tokenizer: tokenizer=pretrained tokenizer\.name_or_path="
    with pytest.raises(ConfigError, match=own):
        train(make_cfg([*overrides, "tokenizer=bpe", "tokenizer.vocab_size=300"]))


def test_eval_on_other_data_keeps_the_checkpoints_direction(tmp_path: Path, make_cfg) -> None:
    pairs = write_pair_splits(tmp_path / "pairs")
    train(
        compose_cfg(
            tmp_path,
            mt_overrides(
                pairs,
                *TINY_TRANSFORMER,
                "trainer.max_steps=6",
                "trainer.val_check_interval=6",
                "test=false",
                "data.source_lang=de",
                "data.target_lang=en",
            ),
            run_dir=tmp_path / "run",
        )
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    files = [
        "data=translation_files",
        f"data.source.train_files={pairs / 'train.jsonl'}",
        f"data.source.test_files={pairs / 'test.jsonl'}",
        "splits=[test]",
    ]
    # the data option's own direction is en->de; the checkpoint's de->en wins
    left_out = evaluate(make_cfg([f"ckpt_path={ckpt}", *files], config_name="eval", run_dir=tmp_path / "eval"))
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())["data"]
    assert (scored["source_lang"], scored["target_lang"]) == ("de", "en")
    assert scored["source"]["columns"] == {"src": "de", "tgt": "en"}
    given = evaluate(
        make_cfg([f"ckpt_path={ckpt}", *files, "data.source_lang=de", "data.target_lang=en"], config_name="eval")
    )
    assert left_out == given
    with pytest.raises(CheckpointMismatchError, match=r"data.source_lang='de'.*data.source_lang='en'"):
        evaluate(
            make_cfg([f"ckpt_path={ckpt}", *files, "data.source_lang=en", "data.target_lang=de"], config_name="eval")
        )
    # another test file, named on its own: the checkpoint supplies the columns, the direction and the rest
    other = write_pairs(tmp_path / "other.jsonl", 40, 7)
    on_its_own = evaluate(
        make_cfg(
            [f"ckpt_path={ckpt}", f"++data.source.test_files={other}", "splits=[test]"],
            config_name="eval",
            run_dir=tmp_path / "eval2",
        )
    )
    whole = evaluate(
        make_cfg(
            [f"ckpt_path={ckpt}", *files[:2], f"data.source.test_files={other}", "splits=[test]"], config_name="eval"
        )
    )
    assert on_its_own == whole and on_its_own != left_out
    recorded = json.loads((tmp_path / "eval2" / "metrics.json").read_text())["data"]["source"]["test_files"]
    assert recorded == str(other)
    # the training and validation files need not be there: only the file scored is read
    for split in ("train", "val"):
        (pairs / f"{split}.jsonl").rename(tmp_path / f"gone-{split}.jsonl")
    cli = Command(
        [script("lmlab-eval"), f"ckpt_path={ckpt}", f"data.source.test_files={other}", "splits=[test]"],
        tmp_path,
        "eval_cli",
    ).wait()
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert f"test/bleu: {on_its_own['test/bleu']:.4f}" in cli.stdout


def test_file_keys_on_top_of_a_hub_data_set_name_the_data_option_to_use() -> None:
    from omegaconf import OmegaConf

    from lmlab.evaluate import _check_overlay_source

    trained = {
        "source": {
            "_target_": "lmlab.data.tables.HubTable",
            "path": "bentrevett/multi30k",
            "columns": {"source": "de", "target": "en"},
        }
    }
    with pytest.raises(ConfigError, match="data=translation_files"):
        _check_overlay_source(trained, OmegaConf.create({"source": {"test_files": "x.parquet"}}), "m.ckpt")
