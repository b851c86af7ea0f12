"""``lmlab-predict`` serves every task from its checkpoint: labels, continuations, translations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab.errors import ConfigError
from lmlab.generate import generate_samples
from lmlab.predict import predict
from lmlab.translate import translate

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"


def _input(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "in.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f"input={path}"


def test_language_model_lines_are_prompts_continued_as_lmlab_generate_does(make_cfg, tmp_path: Path) -> None:
    ckpt = f"ckpt_path={FIXTURES / 'lm_gpt.ckpt'}"
    options = ["max_new_tokens=12", "top_k=5", "seed=3", "num_samples=2"]
    prompts = ["the red cat", "", "a big mat"]
    records = predict(make_cfg([ckpt, _input(tmp_path, prompts), *options], config_name="predict"))
    assert [r["line"] for r in records] == [1, 3]
    for record in records:
        prompt = prompts[record["line"] - 1]
        expected = generate_samples(make_cfg([ckpt, *options, "temperature=1.0"], config_name="generate"), prompt)
        assert record["samples"] == expected and len(expected) == 2


def test_translation_lines_are_translated_as_lmlab_translate_does(make_cfg, tmp_path: Path) -> None:
    ckpt = f"ckpt_path={FIXTURES / 'mt_transformer.ckpt'}"
    lines = ["one red cat", "", "dog"]
    given = predict(make_cfg([ckpt, _input(tmp_path, lines), "beam_size=2"], config_name="predict"))
    assert given == translate(make_cfg([ckpt, _input(tmp_path, lines), "beam_size=2"], config_name="translate"))
    assert len(given) == 3 and given[1] == ""
    expected = json.loads((FIXTURES / "mt_transformer.expected.json").read_text())["translate"]
    assert (
        predict(make_cfg([ckpt, _input(tmp_path, lines)], config_name="predict"))[0] == expected["beam"].split("\n")[0]
    )


def test_classifier_lines_get_labels(make_cfg, tmp_path: Path) -> None:
    ckpt = f"ckpt_path={FIXTURES / 'cls_transformer.ckpt'}"
    records = predict(make_cfg([ckpt, _input(tmp_path, ["goal of the match", "soup"])], config_name="predict"))
    assert [sorted(r) for r in records] == [["label", "line", "probs"]] * 2
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-5 for r in records)


@pytest.mark.parametrize(
    ("name", "option", "taken"),
    [("lm_gpt", "beam_size=3", "max_new_tokens"), ("cls_bigru", "temperature=0.5", "batch_size")],
)
def test_an_option_of_another_task_is_refused_naming_the_options_taken(
    make_cfg, tmp_path: Path, name: str, option: str, taken: str
) -> None:
    cfg = make_cfg([f"ckpt_path={FIXTURES / name}.ckpt", _input(tmp_path, ["a"]), option], config_name="predict")
    with pytest.raises(ConfigError, match=rf"^{option.split('=')[0]}: .*takes .*{taken}"):
        predict(cfg)
