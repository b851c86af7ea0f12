"""Sweeps through Hydra's submitit launcher with lmlab's settings (``hydra/launcher=local`` and
``hydra/launcher=slurm``): jobs run in processes of their own and the sweep summary still ranks them; the
SLURM job script asks for one task per device and for lmlab's stop signal; and, under stand-ins for SLURM's
commands, a job stopped before its time limit saves, requeues itself and resumes its own run."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.plugins.environments import SLURMEnvironment

from conftest import Command, script
from lmlab.run.preemption import requeue_signal_of
from test_as_installed import TINY

# one worker runs this module's tests, which share its trained fixtures
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("launcher")]

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='needs pip install "lmlab[slurm]"')
job_environment = pytest.importorskip("submitit.core.job_environment")

#: a multi-GPU, multi-node SLURM sweep as docs/sweeps.md shows it
SLURM_DDP = [
    "hydra/launcher=slurm",
    "trainer=ddp",
    "trainer.devices=4",
    "trainer.num_nodes=2",
    "hydra.launcher.partition=gpu",
]


def _ok(command: Command, timeout: float = 300) -> Command:
    command.wait(timeout)
    assert command.returncode == 0, command.stderr[-3000:]
    assert "Traceback" not in command.stderr
    return command


def _sweep(cwd: Path) -> Path:
    found = list(cwd.glob("logs/train/multiruns/*"))
    assert len(found) == 1, f"one sweep folder expected, found {found}"
    return found[0]


def _summary(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "summary.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def local_sweeps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Command]:
    """Two local sweeps, each from a fresh directory, started at once: one of two runs, one whose only run
    has a bad value."""
    typed = {"grid": ["optimizer.lr=1e-3,3e-3"], "bad": ["optimizer.lr=abc"]}
    return {
        name: Command(
            [script("lmlab-train"), "-m", "hydra/launcher=local", *args, *TINY], tmp_path_factory.mktemp(name), name
        )
        for name, args in typed.items()
    }


def test_local_sweep_runs_each_job_in_its_own_process_and_ranks_them(local_sweeps: dict[str, Command]) -> None:
    command = _ok(local_sweeps["grid"])
    sweep = _sweep(command.cwd)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = []
    for job in jobs:
        record = json.loads((job / "metrics.json").read_text())
        assert record["optimized_metric"] == "val/ppl" and math.isfinite(record["value"])
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert Path(record["best_checkpoint"]).parent == job / "checkpoints"
        lrs.append(float(dict(o.split("=", 1) for o in record["overrides"])["optimizer.lr"]))
        launcher = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]["launcher"]
        assert launcher["_target_"].endswith("LocalLauncher") and launcher["timeout_min"] == 10080
    assert lrs == [1e-3, 3e-3]
    # each job ran in a submitit process of its own (a local job's id is its process id), which wrote its result
    results = sorted(sweep.glob(".submitit/*/*_0_result.pkl"))
    assert len(results) == 2 and len({p.parent.name for p in results}) == 2
    assert str(command.proc.pid) not in {p.parent.name for p in results}

    rows = _summary(sweep)
    assert [int(r["rank"]) for r in rows] == [1, 2]
    assert [float(r["val/ppl"]) for r in rows] == sorted(float(r["val/ppl"]) for r in rows)
    assert {Path(r["run_dir"]) for r in rows} == set(jobs)
    for row in rows:
        assert float(row["val/ppl"]) == pytest.approx(
            json.loads((Path(row["run_dir"]) / "metrics.json").read_text())["value"]
        )
    assert "sweep ranked by val/ppl (min)" in command.stdout


def test_a_bad_value_fails_its_job_with_lmlabs_one_line_error(local_sweeps: dict[str, Command]) -> None:
    command = local_sweeps["bad"].wait()
    assert command.returncode == 1
    expected = "Invalid value optimizer.lr='abc': it must be a number"
    (job_err,) = _sweep(command.cwd).glob(".submitit/*/*_0_log.err")
    # one line, printed in the job's own process
    assert job_err.read_text().splitlines()[-1].startswith(f"error: {expected}")
    assert "Traceback" not in job_err.read_text()
    # and reported by the sweep in one line, naming the job's log
    (reported,) = [line for line in command.stderr.splitlines() if line.startswith("error:")]
    assert reported.startswith(f"error: a sweep job failed: {expected}") and str(job_err) in reported
    assert "Traceback" not in command.stderr


def test_slurm_launcher_gives_one_task_per_device_and_lmlabs_stop_signal(tmp_path: Path) -> None:
    """``--cfg hydra`` prints the hydra node alone, where ``${trainer.devices}`` does not resolve; the launcher
    is built from the whole config, as ``--cfg all --resolve`` shows it."""
    done = subprocess.run(
        [script("lmlab-train"), *SLURM_DDP, "--cfg", "all", "--resolve"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)
    launcher = cfg["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu"
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (4, 4, 2)
    assert launcher["submitit_folder"].startswith(cfg["hydra"]["sweep"]["dir"] + "/")
    assert launcher["max_num_timeout"] == 0
    assert launcher["additional_parameters"] == {"signal": "USR1@120", "requeue": True}
    # SLURM sends the signal lmlab's handler takes; submitit's own handler waits on another one
    ours = requeue_signal_of(SLURMEnvironment()).name
    assert ours == "SIG" + launcher["additional_parameters"]["signal"].split("@")[0]
    assert ours != "SIG" + job_environment.JobEnvironment.USR_SIG


# -- stand-ins for SLURM's commands -------------------------------------------------------------------
FAKE_SLURM = '''
"""sbatch, srun, sacct and scontrol on this machine, with their state in $FAKE_SLURM_STATE: sbatch keeps each
job script, and runs it unless FAKE_SLURM_KEEP_ONLY is set (a single job, not an array)."""
import os, re, subprocess, sys
from pathlib import Path

state = Path(os.environ["FAKE_SLURM_STATE"])


def sbatch(script):
    state.mkdir(exist_ok=True)
    job = str(5000 + len(list(state.glob("*.sh"))))
    (state / f"{job}.sh").write_text(Path(script).read_text())
    if os.environ.get("FAKE_SLURM_KEEP_ONLY"):
        sys.exit("sbatch: error: the job script was kept, not run")
    if "#SBATCH --array" in Path(script).read_text():
        sys.exit("sbatch: error: this stand-in runs single jobs only")
    (state / f"{job}.state").write_text("PENDING")
    with (state / f"{job}.log").open("w") as log:  # not sbatch's stdout, which its caller reads to the end
        subprocess.Popen([sys.executable, __file__, "run", job], start_new_session=True, stdout=log, stderr=log)
    print(f"Submitted batch job {job}")


def run(job):
    """The job script, again for as long as the job asks to be requeued."""
    flags = dict(re.findall(r"^#SBATCH --([\\w-]+)=?(.*)$", (state / f"{job}.sh").read_text(), re.M))
    restarts = 0
    while True:
        (state / f"{job}.state").write_text("RUNNING")
        (state / f"{job}.restarts").write_text(str(restarts))
        env = {**os.environ, "SLURM_JOB_ID": job, "SLURM_JOB_NAME": flags["job-name"],
               "SLURM_NTASKS_PER_NODE": flags["ntasks-per-node"], "SLURM_NNODES": flags["nodes"],
               "SLURM_JOB_NUM_NODES": flags["nodes"], "SLURM_NODELIST": "localhost",
               "SLURM_JOB_NODELIST": "localhost", "SLURM_RESTART_COUNT": str(restarts)}
        code = subprocess.call(["bash", str(state / f"{job}.sh")], env=env)
        if not (state / f"{job}.requeue").exists():
            break
        (state / f"{job}.requeue").unlink()
        restarts += 1
    (state / f"{job}.state").write_text("COMPLETED" if code == 0 else "FAILED")


def srun(args):
    logs = {}
    while args[0].startswith("--"):
        flag = args.pop(0)
        if flag in ("--output", "--error"):
            logs[flag] = args.pop(0)
    n = int(os.environ["SLURM_NTASKS_PER_NODE"]) * int(os.environ["SLURM_NNODES"])
    tasks = []
    for rank in range(n):
        env = {**os.environ, "SLURM_NTASKS": str(n), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
               "SLURM_NODEID": "0"}
        out, err = (Path(logs[f].replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t", str(rank)))
                    for f in ("--output", "--error"))
        out.parent.mkdir(parents=True, exist_ok=True)
        tasks.append(subprocess.Popen(args, env=env, stdout=out.open("a"), stderr=err.open("a")))
    (state / f"{os.environ['SLURM_JOB_ID']}.pids").write_text(" ".join(str(t.pid) for t in tasks))
    sys.exit(max(t.wait() for t in tasks) & 255)


def sacct():
    print("JobID|State|NodeList")
    for path in sorted(state.glob("*.state")):
        print(f"{path.stem}|{path.read_text()}|localhost")


def scontrol(args):
    assert args[0] == "requeue", args
    (state / f"{args[1]}.requeue").touch()


if sys.argv[1:2] == ["run"]:
    run(sys.argv[2])
else:
    name, args = Path(sys.argv[0]).name, sys.argv[1:]
    {"sbatch": lambda: sbatch(args[-1]), "srun": lambda: srun(args), "sacct": sacct,
     "scontrol": lambda: scontrol(args)}[name]()
'''


def _fake_slurm(tmp_path: Path, **env: str) -> dict[str, str]:
    """The environment of a command that finds the stand-ins first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "fake_slurm.py"
    tool.write_text(f"#!{sys.executable}\n{FAKE_SLURM}")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    for name in ("sbatch", "srun", "sacct", "scontrol"):
        (bin_dir / name).symlink_to(tool)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_STATE": str(tmp_path / "slurm"), **env}


def test_slurm_job_script_asks_for_the_tasks_devices_and_signal_of_the_run(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = _fake_slurm(tmp_path, FAKE_SLURM_KEEP_ONLY="1")
    command = Command([script("lmlab-train"), "-m", *SLURM_DDP, "optimizer.lr=1e-3,3e-3"], cwd, "sbatch", env)
    command.wait(120)
    assert command.returncode != 0  # the stand-in sbatch refuses the job after keeping its script
    (kept,) = (tmp_path / "slurm").glob("*.sh")
    flags = {line.split("=", 1)[0]: line.partition("=")[2] for line in kept.read_text().splitlines()}
    for flag, value in {
        "--array": "0-1%2",
        "--partition": "gpu",
        "--nodes": "2",
        "--ntasks-per-node": "4",
        "--gpus-per-node": "4",
        "--time": "240",
        "--signal": "USR1@120",
    }.items():
        assert flags.get(f"#SBATCH {flag}") == value, flag
    assert "#SBATCH --requeue" in flags
    assert f"{_sweep(cwd)}/.submitit/" in kept.read_text()


def _kill_left_behind(state: Path, tmp_path: Path) -> None:
    """End the tasks of a job that a failed test left running (only processes whose command line names
    this test's folder: a finished task's process id may belong to another process by now)."""
    for path in state.glob("*.pids"):
        for pid in path.read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline")
            with contextlib.suppress(OSError):
                if str(tmp_path) in cmdline.read_text():
                    os.kill(int(pid), signal.SIGKILL)


@pytest.mark.slow
def test_slurm_job_stopped_before_its_time_limit_requeues_itself_and_resumes(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run = [
        "hydra.launcher.gpus_per_node=null",
        *[o for o in TINY if not o.startswith("trainer.max_steps")],
        "trainer.max_steps=300",
        "trainer.val_check_interval=20",
    ]
    command = Command(
        [script("lmlab-train"), "-m", "hydra/launcher=slurm", *run], cwd, "requeue", _fake_slurm(tmp_path)
    )
    state = tmp_path / "slurm"
    try:
        # the time limit's signal, as SLURM sends it to the job's task, once the run has saved a checkpoint
        deadline = time.monotonic() + 240
        while not list(cwd.glob("logs/train/multiruns/*/0/checkpoints/step_*.ckpt")):
            assert command.proc.poll() is None and time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.2)
        (task,) = (int(pid) for pid in (state / "5000.pids").read_text().split())
        os.kill(task, signal.SIGUSR1)
        _ok(command)
    except BaseException:
        _kill_left_behind(state, tmp_path)
        raise

    assert (state / "5000.restarts").read_text() == "1", "requeued once"
    job = _sweep(cwd) / "0"
    saved = job / "checkpoints" / "interrupted.ckpt"
    assert saved.is_file()
    log = (job / "train.log").read_text()
    assert "SIGUSR1: stopping after the current batch" in log
    assert f"Requeued SLURM job 5000: resuming from {saved}" in log
    record = json.loads((job / "metrics.json").read_text())
    assert "status" not in record and math.isfinite(record["value"])
    assert [Path(r["run_dir"]) for r in _summary(_sweep(cwd))] == [job]
