"""Reliability trials: hard kills, stop signals, crafted checkpoints, cache races and bad input, each run
through the console scripts as a user or a scheduler would, with the figures printed at the end.

    python scripts/reliability.py                       # all trials (about 15 minutes on 2 CPU cores)
    python scripts/reliability.py --only kills signals  # some of them
    python scripts/reliability.py --kills 10 --seed 1

* kills: ``kill -9`` at random moments of a run (during steps, and while a checkpoint is being written),
  then ``lmlab-train ckpt_path=last``; a kill is survived when the resumed run logs the same losses as an
  uninterrupted one from its checkpoint on. Also counts torn checkpoints that blocked a resume.
* signals: SIGTERM, Ctrl-C (SIGINT) and SLURM's requeue signal (SIGUSR1, with a stand-in ``scontrol``) at
  random moments: the exit status must be 128 + the signal, ``interrupted.ckpt`` must load, and the resumed
  run (for SIGUSR1: the requeued job, with no ``ckpt_path``) must log the same losses.
* crafted: checkpoints whose configs would run code when built, given to every entry point and to the
  averaging script: counts those that ran anything (goal 0).
* cache: eight runs that need the same new cache entry, started together: counts the builds (goal 1) and
  compares the wall time with one run alone.
* bad_input: a catalogue of mistakes; one is handled when the command exits non-zero with one ``error:``
  line and no traceback.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
# a run of a few thousand steps: a 4-layer GPT on the built-in pydoc text, big enough that a checkpoint
# takes a moment to write, validating every 100 steps and saving last.ckpt every 3 s of training
RUN = [
    "model.n_layer=4",
    "model.n_embd=256",
    "model.n_head=4",
    "model.dropout=0.1",
    "data.block_size=64",
    "data.batch_size=8",
    "trainer.max_steps=400",
    "trainer.val_check_interval=100",
    "trainer.limit_val_batches=4",
    "trainer.log_every_n_steps=1",
    "test=false",
    "print_config=false",
    "callbacks.periodic_checkpoint.every_minutes=0.05",
    "callbacks.rich_progress_bar=null",
]


def command(name: str, *args: str) -> list[str]:
    return [str(BIN / name), *args]


def start(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    inherited = {k: v for k, v in os.environ.items() if k != "LMLAB_ROOT"}
    full_env = {**inherited, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    with (cwd / "stdout.txt").open("a") as out, (cwd / "stderr.txt").open("a") as err:
        return subprocess.Popen(args, cwd=cwd, env=full_env, stdout=out, stderr=err)


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 900) -> int:
    return start(args, cwd, env).wait(timeout=timeout)


def losses(folder: Path) -> dict[int, float]:
    """train/loss per logged step over every run under ``folder``."""
    found: dict[int, float] = {}
    for path in sorted(folder.glob("logs/train/runs/*/csv/metrics.csv")):
        with path.open() as f:
            found.update({int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")})
    return found


def runs(folder: Path) -> list[Path]:
    return sorted(folder.glob("logs/train/runs/*"))


def same_from(resumed: dict[int, float], straight: dict[int, float], first: int) -> bool:
    steps = [s for s in straight if s >= first]
    return bool(steps) and all(
        s in resumed and abs(resumed[s] - straight[s]) <= 1e-6 * abs(straight[s]) + 1e-7 for s in steps
    )


def resumed_step(folder: Path) -> int | None:
    """The first step the resumed (second) run logged."""
    later = runs(folder)[1:]
    if not later:
        return None
    with (later[0] / "csv" / "metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    return min(steps) if steps else None


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 600, poll: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(poll)
    return False


def checkpoints(folder: Path, pattern: str) -> list[Path]:
    return list(folder.glob(f"logs/train/runs/*/checkpoints/{pattern}"))


# -- kills -------------------------------------------------------------------------------------------------
def trial_kills(work: Path, n: int, rng: random.Random, straight: dict[int, float]) -> dict[str, Any]:
    survived, torn_blocks, saves_cut, results = 0, 0, 0, []
    for i in range(n):
        during_save = i % 2 == 1
        folder = work / f"kill{i}"
        proc = start(command("lmlab-train", *RUN), folder)
        wait_for(lambda folder=folder: bool(checkpoints(folder, "last.ckpt")), proc)
        if during_save:  # the moment a checkpoint's temporary file appears
            wait_for(lambda folder=folder: bool(checkpoints(folder, ".*.tmp")), proc, poll=0.001)
        else:
            time.sleep(rng.uniform(0.5, 8.0))
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mid_save = bool(checkpoints(folder, ".*.tmp"))  # a write the kill cut short
        code = run(command("lmlab-train", *RUN, "ckpt_path=last"), folder)
        first = resumed_step(folder)
        ok = killed and code == 0 and first is not None and same_from(losses(folder), straight, first)
        torn_blocks += int(code != 0 and "ckpt_path=last" in (folder / "stderr.txt").read_text())
        survived += int(ok)
        saves_cut += int(mid_save)
        results.append(
            f"kill {i} ({'during a save' if mid_save else 'during steps'}): resumed at step "
            f"{first}, exit {code}, {'same losses' if ok else 'DIFFERENT or failed'}"
        )
    return {
        "kills survived with identical losses": f"{survived}/{n}",
        "kills that cut a checkpoint write short": saves_cut,
        "torn checkpoints that blocked a resume": torn_blocks,
        "details": results,
    }


# -- signals -----------------------------------------------------------------------------------------------
def trial_signals(work: Path, n: int, rng: random.Random, straight: dict[int, float]) -> dict[str, Any]:
    kinds = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]
    good, results = 0, []
    bin_dir = work / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$PWD/scontrol.calls"\n')
    scontrol.chmod(0o755)
    for i in range(n):
        signum = kinds[i % len(kinds)]
        folder = work / f"signal{i}"
        env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        if signum == signal.SIGUSR1:
            env.update(SLURM_JOB_ID=str(1000 + i), SLURM_RESTART_COUNT="0")
        proc = start(command("lmlab-train", *RUN), folder, env)
        wait_for(lambda folder=folder: bool(checkpoints(folder, "last.ckpt")), proc)
        time.sleep(rng.uniform(0.2, 6.0))
        proc.send_signal(signum)
        code = proc.wait(timeout=300)
        saved = checkpoints(folder, "interrupted.ckpt")
        loads = bool(saved) and "lmlab" in torch.load(saved[0], map_location="cpu", weights_only=True)
        if signum == signal.SIGUSR1:  # the requeued job: same command, restart counted
            requeued = (folder / "scontrol.calls").is_file()
            resume = run(command("lmlab-train", *RUN), folder, {**env, "SLURM_RESTART_COUNT": "1"})
        else:
            requeued = True
            resume = run(command("lmlab-train", *RUN, "ckpt_path=last"), folder)
        first = resumed_step(folder)
        ok = (
            code == 128 + signum
            and loads
            and requeued
            and resume == 0
            and first is not None
            and same_from(losses(folder), straight, first)
        )
        good += int(ok)
        results.append(
            f"{signal.Signals(signum).name}: exit {code}, interrupted.ckpt {'loads' if loads else 'MISSING'}"
            f", resumed at step {first}, {'same losses' if ok else 'FAILED'}"
        )
    return {"stops saved, exited 128+signal and resumed identically": f"{good}/{n}", "details": results}


# -- crafted checkpoints -------------------------------------------------------------------------------------
def _writes(marker: Path) -> dict[str, Any]:
    return {
        "_target_": "pathlib.Path.write_text",
        "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]},
        "data": "ran",
    }


def crafted(ckpt: dict[str, Any], variant: str, marker: Path) -> dict[str, Any]:
    """A copy of a real checkpoint with a config that would create ``marker`` when built."""
    copied = copy.deepcopy(ckpt)
    hyper, extras = copied["hyper_parameters"], copied["lmlab"]
    if variant == "network target":
        hyper["model"] = _writes(marker)
    elif variant == "nested target":
        hyper["model"]["extra"] = _writes(marker)
    elif variant == "positional args":
        hyper["model"]["_args_"] = [_writes(marker)]
    elif variant == "partial":
        hyper["model"] = {**_writes(marker), "_partial_": True}
    elif variant == "data source":
        extras["config"]["data"]["source"] = _writes(marker)
    elif variant == "tokenizer":
        extras["config"]["tokenizer"] = _writes(marker)
    elif variant == "task":
        extras["task"] = "pathlib.Path.touch"
    elif variant == "resolver":
        node = "{_target_: pathlib.Path.touch, self: {_target_: pathlib.Path, _args_: ['" + str(marker) + "']}}"
        hyper["model"]["n_layer"] = "${oc.create:" + node + "}"
    else:  # a pickled object that runs code when unpickled
        return {"lmlab": {}, "payload": _RunsOnUnpickle(marker)}
    return copied


VARIANTS = [
    "network target",
    "nested target",
    "positional args",
    "partial",
    "data source",
    "tokenizer",
    "task",
    "resolver",
    "pickle",
]


class _RunsOnUnpickle:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (str(self.marker),)


def trial_crafted(work: Path, legit: Path) -> dict[str, Any]:
    ckpt = torch.load(legit, map_location="cpu", weights_only=True)
    text = work / "input.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text("a line to work on\n")
    ran, refused, total, details = 0, 0, 0, []
    for name in VARIANTS:
        folder = work / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / "ran"
        path = folder / "crafted.ckpt"
        torch.save(crafted(ckpt, name, marker), path)
        entry_points = {
            "lmlab-eval": command("lmlab-eval", f"ckpt_path={path}"),
            "lmlab-generate": command("lmlab-generate", f"ckpt_path={path}"),
            "lmlab-predict": command("lmlab-predict", f"ckpt_path={path}", f"input={text}"),
            "lmlab-translate": command("lmlab-translate", f"ckpt_path={path}", f"input={text}"),
            "lmlab-train (resume)": command("lmlab-train", f"ckpt_path={path}", "trainer.max_steps=2"),
            "lmlab-average": command("lmlab-average", str(path), str(path), "--out", str(folder / "averaged.ckpt")),
        }
        procs = {entry: start(args, folder / entry.split()[0]) for entry, args in entry_points.items()}
        for entry, proc in procs.items():
            proc.wait(timeout=300)
            total += 1
            err = (folder / entry.split()[0] / "stderr.txt").read_text()
            executed = marker.exists() or (folder / "averaged.ckpt").exists()
            ran += int(executed)
            refused += int(proc.returncode == 1 and "Refusing to load" in err and "Traceback" not in err)
            details.append(f"{name} -> {entry}: exit {proc.returncode}, {'RAN CODE' if executed else 'nothing ran'}")
    return {
        "crafted checkpoints that executed anything": f"{ran}/{total}",
        "refused with the one-line message": f"{refused}/{total}",
        "details": details,
    }


# -- the token cache ------------------------------------------------------------------------------------------
def trial_cache(work: Path, racers: int) -> dict[str, Any]:
    if not (SHARED / "tiny_shakespeare" / "input.txt").is_file():
        return {"skipped": f"{SHARED} is not present"}
    prepare = [
        "data=text_files",
        f"data.source.train_files={SHARED / 'tiny_shakespeare' / 'input.txt'}",
        "tokenizer=bpe",
        "tokenizer.vocab_size=4096",
        "train=false",
        "test=false",
        "print_config=false",
    ]

    def race(folder: Path, n: int) -> tuple[float, int]:
        began = time.perf_counter()
        procs = [start(command("lmlab-train", *prepare, f"hydra.run.dir=logs/run{i}"), folder) for i in range(n)]
        codes = [p.wait(timeout=1800) for p in procs]
        assert all(c == 0 for c in codes), f"a preparing run failed: {codes}"
        builds = sum(line.count("Built cache entry") for line in (folder / "stdout.txt").read_text().splitlines())
        return time.perf_counter() - began, builds

    alone, _ = race(work / "alone", 1)
    together, builds = race(work / "together", racers)
    return {
        f"cache builds when {racers} runs need one new entry": builds,
        "wall, one run (s)": round(alone, 1),
        f"wall, {racers} runs together (s)": round(together, 1),
    }


# -- bad input ----------------------------------------------------------------------------------------------
def bad_inputs(work: Path, ckpt: Path) -> dict[str, list[str]]:
    """Name -> command (console script and overrides) of each mistake in the catalogue."""
    work.mkdir(parents=True, exist_ok=True)
    empty, latin1, jsonl = work / "empty.txt", work / "latin1.txt", work / "rows.jsonl"
    empty.write_text("")
    latin1.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 50)
    jsonl.write_text('{"body": "some text", "label": "a"}\n' * 50)
    truncated, notes = work / "truncated.ckpt", work / "notes.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:2000])
    notes.write_text("not a checkpoint\n")
    single = work / "single.jsonl"
    single.write_text('{"text": "only one class here", "label": "a"}\n' * 40)
    src, tgt = work / "a.de", work / "a.en"
    src.write_text("eins\nzwei\n")
    tgt.write_text("one\n")
    train, gen, ck = "lmlab-train", "lmlab-generate", f"ckpt_path={ckpt}"
    text_files = ["data=text_files"]
    return {
        "unknown option": [train, "model=gtp"],
        "unknown key": [train, "model.n_layr=4"],
        "unknown trainer key": [train, "trainer.max_step=10"],
        "unknown key with +": [train, "+model.n_layr=4"],
        "unknown top-level key": [train, "+trian=true"],
        "lr not a number": [train, "optimizer.lr=abc"],
        "negative lr": [train, "optimizer.lr=-1"],
        "negative weight decay": [train, "optimizer.weight_decay=-1"],
        "seed not a number": [train, "seed=abc"],
        "negative workers": [train, "data.num_workers=-1"],
        "zero batch size": [train, "data.batch_size=0"],
        "zero eval batch size": [train, "data.eval_batch_size=0"],
        "zero block size": [train, "data.block_size=0"],
        "zero validation interval": [train, "trainer.val_check_interval=0"],
        "zero max steps": [train, "trainer.max_steps=0"],
        "fractional max steps": [train, "trainer.max_steps=2.5"],
        "zero accumulation": [train, "trainer.accumulate_grad_batches=0"],
        "unknown precision": [train, "trainer.precision=bf17"],
        "gpu without one": [train, "trainer.accelerator=gpu"] if not torch.cuda.is_available() else [train, "x=1"],
        "bpe vocabulary 0": [train, "tokenizer=bpe", "tokenizer.vocab_size=0"],
        "zero layers": [train, "model.n_layer=0"],
        "dropout above 1": [train, "model.dropout=1.5"],
        "negative warmup": [train, "scheduler.warmup_steps=-5"],
        "zero clock interval": [train, "callbacks.periodic_checkpoint.every_minutes=0"],
        "missing train files": [train, *text_files],
        "no such data file": [train, *text_files, "data.source.train_files=/no/such/file.txt"],
        "empty data file": [train, *text_files, f"data.source.train_files={empty}"],
        "non-UTF-8 data file": [train, *text_files, f"data.source.train_files={latin1}"],
        "missing text column": [train, *text_files, f"data.source.train_files={jsonl}"],
        "val fraction above 1": [train, *text_files, f"data.source.train_files={jsonl}", "data.source.val_fraction=2"],
        "data of another task": [train, "task=classification", "data=text_files"],
        "missing label column": [
            train,
            "task=classification",
            "data=labeled_files",
            f"data.source.train_files={jsonl}",
        ],
        "a single class": [train, "task=classification", "data=labeled_files", f"data.source.train_files={single}"],
        "aligned files of different lengths": [
            train,
            "task=translation",
            "data=aligned_text",
            f"data.source.train.src={src}",
            f"data.source.train.tgt={tgt}",
        ],
        "resume from no such file": [train, "ckpt_path=/no/such.ckpt"],
        "resume with another model": [train, ck, "model=lstm"],
        "resume from a truncated file": [train, f"ckpt_path={truncated}"],
        "eval without ckpt_path": ["lmlab-eval"],
        "eval of a truncated checkpoint": ["lmlab-eval", f"ckpt_path={truncated}"],
        "eval of a file that is no checkpoint": ["lmlab-eval", f"ckpt_path={notes}"],
        "eval of an unknown split": ["lmlab-eval", ck, "splits=[train]"],
        "generate without ckpt_path": [gen],
        "generate zero samples": [gen, ck, "num_samples=0"],
        "generate negative temperature": [gen, ck, "temperature=-1"],
        "generate zero tokens": [gen, ck, "max_new_tokens=0"],
        "generate top_p 0": [gen, ck, "top_p=0"],
        "generate with another model": [gen, ck, "model=lstm"],
        "generate outside the character vocabulary": [gen, ck, "prompt='\u2603'"],
        "generate with an unquoted non-ASCII prompt": [gen, ck, "prompt=\u2603"],
        "generate on a cuda device without one": [gen, ck, "device=cuda"]
        if not torch.cuda.is_available()
        else [gen, ck, "device=nonsense"],
        "predict with a language model": ["lmlab-predict", ck, f"input={empty}"],
        "predict zero batch size": ["lmlab-predict", ck, "batch_size=0"],
        "generate negative top_k": [gen, ck, "top_k=-1"],
        "translate with a language model": ["lmlab-translate", ck, f"input={empty}"],
        "translate zero beam": ["lmlab-translate", ck, "beam_size=0"],
        "read-only run folder": [train, "trainer.max_steps=2"],
    }


def trial_bad_input(work: Path, ckpt: Path) -> dict[str, Any]:
    clear, details = 0, []
    catalogue = bad_inputs(work / "files", ckpt)
    for name, args in catalogue.items():
        folder = work / name.replace(" ", "_").replace("/", "_")
        env = {"LMLAB_ROOT": "/sys/lmlab-read-only"} if name == "read-only run folder" else None
        code = start(command(args[0], *args[1:]), folder, env).wait(timeout=600)
        err = (folder / "stderr.txt").read_text()
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        ok = code != 0 and len(lines) == 1 and "Traceback" not in err
        clear += int(ok)
        details.append(f"{'ok ' if ok else 'BAD'} {name}: exit {code}: {lines[0][:150] if lines else err[-300:]!r}")
    return {"bad inputs with one clear message": f"{clear}/{len(catalogue)}", "details": details}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    trials = ["kills", "signals", "crafted", "cache", "bad_input"]
    parser.add_argument("--only", nargs="+", choices=trials, default=trials)
    parser.add_argument("--kills", type=int, default=6, help="kill -9 trials (half of them during a save)")
    parser.add_argument("--signals", type=int, default=6, help="stop-signal trials (SIGTERM, SIGINT, SIGUSR1 in turn)")
    parser.add_argument("--racers", type=int, default=8, help="runs racing for one cache entry")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lmlab-reliability-"))
    rng = random.Random(args.seed)
    print(f"scratch folder: {work}", flush=True)

    reference = work / "straight"
    assert run(command("lmlab-train", *RUN), reference) == 0, f"the reference run failed: see {reference}"
    straight = losses(reference)
    legit = checkpoints(reference, "last.ckpt")[0]
    figures: dict[str, dict[str, Any]] = {}
    for name in args.only:
        began = time.perf_counter()
        if name == "kills":
            figures[name] = trial_kills(work / name, args.kills, rng, straight)
        elif name == "signals":
            figures[name] = trial_signals(work / name, args.signals, rng, straight)
        elif name == "crafted":
            figures[name] = trial_crafted(work / name, legit)
        elif name == "cache":
            figures[name] = trial_cache(work / name, args.racers)
        else:
            figures[name] = trial_bad_input(work / name, legit)
        figures[name]["trial wall (s)"] = round(time.perf_counter() - began, 1)
        print(f"-- {name}", flush=True)
        for key, value in figures[name].items():
            if key != "details":
                print(f"   {key}: {value}", flush=True)
        for line in figures[name].get("details", []):
            print(f"     {line}", flush=True)
    print("\nsummary")
    for name, result in figures.items():
        for key, value in result.items():
            if key != "details":
                print(f"  {name:10s} {key}: {value}")


if __name__ == "__main__":
    main()
