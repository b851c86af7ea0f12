"""DDP that works inside Hydra runs and multiruns.

Lightning starts DDP worker processes by re-running the command line. Inside a Hydra multirun
that command line is the whole sweep, so each worker would start a sweep of its own and write
elsewhere. Here workers instead re-compose the job's own saved config (``.hydra/config.yaml`` in
the job's output folder) and write into that same folder.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher


def _job_subprocess_cmd(local_rank: int) -> tuple[Sequence[str], str]:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    config_dir = job_dir / (hydra_cfg.output_subdir or ".hydra")
    command = [
        sys.executable, "-m", "lmlab.train",
        f"--config-path={config_dir}", "--config-name=config",
        f"hydra.run.dir={job_dir}", "hydra.output_subdir=null",
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",
    ]
    return command, hydra_cfg.runtime.cwd


class _HydraJobLauncher(_SubprocessScriptLauncher):
    def _call_children_scripts(self) -> None:
        with mock.patch.object(subprocess_script, "_hydra_subprocess_cmd", _job_subprocess_cmd):
            super()._call_children_scripts()


class HydraDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose worker processes run the current Hydra job, not the whole command line."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
