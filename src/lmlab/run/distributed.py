"""DDP that works inside Hydra runs and multiruns.

Lightning starts DDP worker processes by re-running the command line. Inside a Hydra multirun
that command line is the whole sweep, so each worker would start a sweep of its own and write
elsewhere. Here workers instead re-compose the job's own saved config (``.hydra/config.yaml`` in
the job's output folder) and write into that same folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher


def _job_subprocess_cmd(local_rank: int) -> tuple[Sequence[str], str]:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    config_dir = job_dir / (hydra_cfg.output_subdir or ".hydra")
    command = [
        sys.executable,
        "-m",
        "lmlab.train",
        f"--config-path={config_dir}",
        "--config-name=config",
        f"hydra.run.dir={job_dir}",
        "hydra.output_subdir=null",
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",
    ]
    return command, hydra_cfg.runtime.cwd


class _HydraJobLauncher(_SubprocessScriptLauncher):
    def _call_children_scripts(self) -> None:
        global _launched
        env_before = {key: os.environ.get(key) for key in _LAUNCH_ENV}
        with mock.patch.object(subprocess_script, "_hydra_subprocess_cmd", _job_subprocess_cmd):
            super()._call_children_scripts()
        _launched = (env_before, list(self.procs))


# Variables the launcher sets in this process; with LOCAL_RANK set, Lightning takes the process for a
# worker and starts none.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# (environment before, worker processes) of the job that launched DDP workers from this process
_launched: tuple[dict[str, str | None], list[subprocess.Popen]] | None = None


def end_job(timeout: float = 60.0) -> None:
    """After a job that started its own DDP workers: wait for them, close the process group and
    restore the environment, so the next job of a multirun starts workers of its own instead of
    talking to the finished ones."""
    global _launched
    if _launched is None:
        return
    env_before, procs = _launched
    _launched = None
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in env_before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class HydraDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose worker processes run the current Hydra job, not the whole command line."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
