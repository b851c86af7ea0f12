"""Build the small checkpoints that tests/test_checkpoint_compat.py loads, with the outputs they gave when built.

    python scripts/make_checkpoint_fixtures.py [--out tests/fixtures/checkpoints]

One tiny checkpoint per task and model family is trained with ``lmlab-train`` on generated data (written into
``--out/data``), then read back with the entry points users run (``lmlab-eval``, ``lmlab-generate``,
``lmlab-predict``, ``lmlab-translate``) and with the network directly (logits of fixed ids). Each checkpoint's
outputs go to ``<name>.expected.json`` and its logits to ``<name>.logits.pt``, with the commit that wrote them.
Later versions of lmlab must load these files and give the same outputs, so the fixtures are rebuilt only when a
change of format is intended.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LEXICON = {"one": "eins", "two": "zwei", "three": "drei", "red": "rot", "blue": "blau", "cat": "katze", "dog": "hund"}
CUES = {"food": ["soup", "bread"], "sports": ["goal", "match"], "tech": ["chip", "code"]}
FILLER = "the a of and to in it is was for on with".split()
LIMITS = [
    "trainer.max_steps=30",
    "trainer.val_check_interval=15",
    "trainer.enable_progress_bar=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.periodic_checkpoint=null",
    "logger=csv",
]

#: name -> (train overrides after the data files, inputs for the inference entry point)
FIXTURES: dict[str, list[str]] = {
    "lm_gpt": ["model=gpt", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "data.block_size=32"],
    "lm_lstm": ["model=lstm", "model.n_layer=1", "model.n_embd=32", "model.hidden_size=32", "data.block_size=32"],
    "cls_transformer": [
        "task=classification",
        "model=transformer_encoder",
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        "data.max_length=40",
        "data.batch_size=16",
    ],
    "cls_bigru": [
        "task=classification",
        "model=bigru",
        "model.embedding.dim=32",
        "model.hidden_size=32",
        "data.max_length=40",
    ],
    "mt_transformer": [
        "task=translation",
        "model=transformer_seq2seq",
        "model.n_embd=32",
        "model.n_head=2",
        "model.encoder_layers=1",
        "model.decoder_layers=1",
        "model.max_positions=32",
        "data.max_source_length=16",
        "data.max_target_length=16",
        "data.max_tokens=256",
        "tokenizer=word",
        "task.module.test_decoding.beam_size=3",
    ],
    "mt_gru_attention": [
        "task=translation",
        "model=gru_attention",
        "model.embedding_dim=32",
        "model.hidden_size=32",
        "model.encoder_layers=1",
        "model.decoder_layers=1",
        "data.max_source_length=16",
        "data.max_target_length=16",
        "data.max_tokens=256",
        "tokenizer=word",
        "task.module.test_decoding.beam_size=3",
    ],
}
PROMPT = "the red cat"
TEXTS = ["the soup was on the a", "goal of the match", "it is code for the chip"]
SENTENCES = ["one red cat", "two blue dog three", "dog"]


def write_data(folder: Path) -> None:
    """Generated, learnable data of each task: text, labelled texts and toy sentence pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = [f"the {a} cat sat on the {b} mat." for a in ("red", "big", "old") for b in ("blue", "flat")]
    for split, repeat in (("train", 60), ("val", 6), ("test", 6)):
        (folder / f"{split}.txt").write_text("\n".join(lines * repeat) + "\n", encoding="utf-8")
        labeled, pairs = [], []
        for i in range({"train": 300, "val": 45, "test": 45}[split]):
            label = list(CUES)[i % len(CUES)]
            words = [rng.choice(FILLER) for _ in range(rng.randint(3, 12))]
            words.insert(rng.randrange(len(words) + 1), rng.choice(CUES[label]))
            labeled.append(json.dumps({"text": " ".join(words), "label": label}))
            sentence = [rng.choice(sorted(LEXICON)) for _ in range(rng.randint(1, 5))]
            pairs.append(json.dumps({"en": " ".join(sentence), "de": " ".join(LEXICON[w] for w in reversed(sentence))}))
        (folder / f"{split}.labeled.jsonl").write_text("\n".join(labeled) + "\n", encoding="utf-8")
        (folder / f"{split}.pairs.jsonl").write_text("\n".join(pairs) + "\n", encoding="utf-8")


def data_overrides(name: str, data: Path) -> list[str]:
    if name.startswith("lm_"):
        kind, prefix = "txt", ["data=text_files", "tokenizer=char"]
    elif name.startswith("cls_"):
        kind, prefix = "labeled.jsonl", ["data=labeled_files", "tokenizer=word"]
    else:
        kind, prefix = "pairs.jsonl", ["data=translation_files"]
    files = {s: data / f"{s}.{kind}" for s in ("train", "val", "test")}
    return [*prefix, *(f"data.source.{s}_files={p}" for s, p in files.items())]


def lmlab(command: str, args: list[str], cwd: Path, stdin: str | None = None) -> str:
    result = subprocess.run(
        [str(BIN / command), *args], cwd=cwd, input=stdin, capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise SystemExit(f"{command} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def fixed_ids(name: str, task: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Inputs whose logits are recorded: a few ids of each kind of network input, from seed 0."""
    g = torch.Generator().manual_seed(0)
    info = task.hparams.data_info
    if name.startswith("lm_"):
        return (torch.randint(info["vocab_size"], (2, 12), generator=g),)
    if name.startswith("cls_"):
        ids = torch.randint(4, info["vocab_size"] - 1, (2, 10), generator=g)
        ids[1, 7:] = info["pad_id"]
        return ids, torch.tensor([10, 7])
    src = torch.randint(3, info["src_vocab_size"], (2, 8), generator=g)
    src[1, 5:] = info["src_pad_id"]
    tgt_in = torch.randint(3, info["tgt_vocab_size"], (2, 6), generator=g)
    tgt_in[:, 0] = info["eos_id"]
    return src, torch.tensor([8, 5]), tgt_in


def network_logits(task: torch.nn.Module, inputs: tuple[torch.Tensor, ...], lm: bool) -> torch.Tensor:
    with torch.no_grad():
        out = task.net.eval()(*inputs)
    return out[0] if lm else out


def build(name: str, out: Path, work: Path) -> dict[str, object]:
    from lmlab.run.checkpoint import load_task

    run = work / name
    run.mkdir()
    data = out / "data"
    train = [*data_overrides(name, data), *FIXTURES[name], *LIMITS, f"hydra.run.dir={run / 'train'}"]
    lmlab("lmlab-train", train, run)
    ckpt = out / f"{name}.ckpt"
    shutil.copy(run / "train" / "checkpoints" / "last.ckpt", ckpt)
    expected: dict[str, object] = {"train": train[:-1]}
    split_file = next(a.split("=", 1)[1] for a in train if a.startswith("data.source.test_files="))
    lmlab("lmlab-eval", [f"ckpt_path={ckpt}", f"hydra.run.dir={run / 'eval'}"], run)
    expected["eval"] = json.loads((run / "eval" / "metrics.json").read_text())["metrics"]
    expected["eval_test_file"] = Path(split_file).name
    if name.startswith("lm_"):
        args = [f"ckpt_path={ckpt}", f"prompt='{PROMPT}'", "max_new_tokens=20", "temperature=0", "seed=0"]
        expected["generate"] = {"args": args[1:], "stdout": lmlab("lmlab-generate", args, run)}
        sampled = [f"ckpt_path={ckpt}", f"prompt='{PROMPT}'", "max_new_tokens=20", "top_k=5", "seed=3"]
        expected["sample"] = {"args": sampled[1:], "stdout": lmlab("lmlab-generate", sampled, run)}
    elif name.startswith("cls_"):
        stdin = "\n".join(TEXTS) + "\n"
        expected["predict"] = {"stdin": stdin, "stdout": lmlab("lmlab-predict", [f"ckpt_path={ckpt}"], run, stdin)}
    else:
        stdin = "\n".join(SENTENCES) + "\n"
        greedy = lmlab("lmlab-translate", [f"ckpt_path={ckpt}", "beam_size=1"], run, stdin)
        beam = lmlab("lmlab-translate", [f"ckpt_path={ckpt}"], run, stdin)
        expected["translate"] = {"stdin": stdin, "greedy": greedy, "beam": beam}
    task, _ = load_task(ckpt)
    inputs = fixed_ids(name, task)
    torch.save(
        {"inputs": inputs, "logits": network_logits(task, inputs, name.startswith("lm_"))}, out / f"{name}.logits.pt"
    )
    return expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "checkpoints")
    parser.add_argument("--only", nargs="*", default=sorted(FIXTURES), choices=sorted(FIXTURES))
    args = parser.parse_args()
    out: Path = args.out.resolve()
    write_data(out / "data")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            expected = build(name, out, Path(tmp))
            expected["commit"] = commit
            (out / f"{name}.expected.json").write_text(json.dumps(expected, indent=2, ensure_ascii=False) + "\n")
            print(f"{name}: {out / name}.ckpt ({(out / f'{name}.ckpt').stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
