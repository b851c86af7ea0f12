"""What every task shares: building its network from config, optimizers and schedules, finite-loss
checks, the validation and test loops with their metrics, inference mode, exact-resume RNG state, and the
extras that make a checkpoint self-contained."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from lmlab import __version__
from lmlab.config.signatures import locate
from lmlab.data.info import DataInfo
from lmlab.errors import NonFiniteLossError
from lmlab.models.lora import check_left_out, leave_out_frozen, weights_source
from lmlab.run.runtime import build_network
from lmlab.tokenizers import Tokenizer, tokenizer_from_state

#: the evaluation stages, as metric names start (``val/loss``, ``test/loss``)
STAGES = ("val", "test")


class TaskModule(L.LightningModule):
    """Base LightningModule. A task gives

    - :meth:`training_step`, and :meth:`eval_step`, which returns a batch's mean loss and its weight after
      updating ``self.scores[stage]`` (the task's :meth:`stage_metrics`);
    - :meth:`epoch_metrics`: what is logged at the end of an evaluation besides ``{stage}/loss``;
    - :meth:`infer`: outputs for raw texts, as the inference entry point serves them.

    Hyperparameters are plain containers only (no networks, partials or config objects), so
    checkpoints load with ``torch.load(weights_only=True)``.
    """

    #: fields of the data's info (:mod:`lmlab.data.info`) the network is built from, passed to the model when
    #: its constructor takes them
    network_inputs: tuple[str, ...] = ("vocab_size",)
    #: the data module class (dotted path) this task reads; the config check rejects other data options
    data_module: str = "lmlab.data.base.TaskDataModule"
    #: the base class (dotted path) of the networks this task trains; the config check rejects other networks
    network: str = "torch.nn.Module"
    #: data_info keys (besides the tokenizer) that must be the same in a checkpoint and the data it resumes on
    fixed_by_checkpoint: tuple[str, ...] = ()
    #: data settings the trained network depends on: evaluating on other data keeps the checkpoint's
    checkpoint_data_keys: tuple[str, ...] = ()
    #: the options :meth:`infer` takes
    infer_options: tuple[str, ...] = ()
    #: inference writes one output line per input line (blank for blank); else one JSON record per non-blank line
    aligned_output: bool = False

    def __init__(
        self,
        model: dict[str, Any],
        data_info: Mapping[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        compile: bool = False,
        finite_check_every_n_steps: int = 100,
        tokenizer_state: dict[str, Any] | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # logger=False: lmlab.training.loggers logs the whole run's config, flat, once (this would add a second,
        # nested copy)
        self.save_hyperparameters(ignore=["tokenizer_state", "run_config"], logger=False)
        self.tokenizer_state, self.run_config = tokenizer_state, run_config
        self.tokenizer: Tokenizer | None = tokenizer_from_state(tokenizer_state) if tokenizer_state else None
        info_type: type[DataInfo] = locate(self.data_module).info_type
        info_type.check_inputs(self.network_inputs, type(self).__name__)
        #: what the data decided, typed; ``hparams.data_info`` holds it as the checkpoint stores it
        self.info = info_type.from_dict(data_info)
        self.net = self.build_network(model, self.info)
        self._forward = torch.compile(self.net) if compile else self.net
        self._pending_rng: dict[str, Any] | None = None
        #: the first training step whose loss was not finite (-1: none), kept on the loss's device
        self._first_nonfinite: torch.Tensor | None = None
        self.loss_means = nn.ModuleDict({stage: MeanMetric() for stage in STAGES})
        self.scores = nn.ModuleDict({stage: self.stage_metrics() for stage in STAGES})

    def build_network(self, model: dict[str, Any], info: DataInfo) -> nn.Module:
        return build_network(model, info, self.network_inputs)

    def batch_counts(self, batch: Any) -> tuple[int, int]:
        """``(examples, tokens)`` of a training batch, for throughput: the input tensor's rows and elements."""
        return batch[0].size(0), batch[0].numel()

    # -- what a task gives ----------------------------------------------------------------------
    def stage_metrics(self) -> MetricCollection:
        """The metrics of one evaluation stage besides the loss (a fresh collection per stage)."""
        return MetricCollection({})

    def eval_step(self, batch: Any, stage: str) -> tuple[torch.Tensor, int | torch.Tensor]:
        """The batch's mean loss and how many items it averages over; updates ``self.scores[stage]``."""
        raise NotImplementedError

    def epoch_metrics(self, stage: str, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """What an evaluation logs besides ``{stage}/loss``: by default each of ``self.scores[stage]``."""
        scores = self.scores[stage]
        return {f"{stage}/{name}": value for name, value in scores.compute().items()} if len(scores) else {}

    def observe_data(self, info: DataInfo) -> None:
        """Take the statistics that metrics read (not the network's inputs) from the data about to be scored."""

    def infer(self, texts: Sequence[str], **options: Any) -> list[Any]:
        """The task's output for each text (a continuation, a label, a translation)."""
        raise NotImplementedError

    # -- evaluation ---------------------------------------------------------------------------
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._update_loss(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._update_loss(batch, "test")

    def _update_loss(self, batch: Any, stage: str) -> None:
        loss, weight = self.eval_step(batch, stage)
        self.loss_means[stage].update(loss, weight=weight)

    def on_validation_epoch_end(self) -> None:
        self._log_stage("val")

    def on_test_epoch_end(self) -> None:
        self._log_stage("test")

    def _log_stage(self, stage: str) -> None:
        # torchmetrics reduces the states across processes in compute(), so logging needs no sync of its own
        loss = self.loss_means[stage].compute()
        metrics = {f"{stage}/loss": loss, **self.epoch_metrics(stage, loss)}
        self.loss_means[stage].reset()
        self.scores[stage].reset()
        self.log_dict(metrics, prog_bar=stage == "val", sync_dist=False)

    @contextlib.contextmanager
    def inference(self) -> Iterator[torch.device]:
        """The network in eval mode without gradients, back in its former mode afterwards; yields its device."""
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                yield next(self.net.parameters()).device
        finally:
            self.net.train(was_training)

    def datamodule_kwargs(self) -> dict[str, Any]:
        """What a data module needs to serve data the way this trained task expects (its tokenizer)."""
        return {"tokenizer": self.tokenizer}

    # -- optimization ---------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        opt_cfg = dict(self.hparams.optimizer or {})
        if not opt_cfg:
            raise ValueError("No optimizer configured: set the optimizer group (e.g. optimizer=adamw).")
        weight_decay = opt_cfg.pop("weight_decay", 0.0)
        if "fused" in opt_cfg and opt_cfg["fused"] is None and self.device.type == "cuda":
            opt_cfg["fused"] = True  # one kernel per step for all parameters (``fused: null`` is: on CUDA)
        decay = [p for p in self.net.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.net.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = hydra.utils.instantiate(opt_cfg, _partial_=True)(groups)
        if not self.hparams.scheduler:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        schedule = hydra.utils.instantiate(self.hparams.scheduler, _partial_=True)(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def log_training(self, metrics: dict[str, torch.Tensor], batch_size: int) -> None:
        """A training step's metrics (``train/*``), kept on the device: the loggers read them every
        ``trainer.log_every_n_steps`` steps, and so does the progress bar
        (:class:`lmlab.training.progress.ProgressBar`), so no step waits for the device to report them."""
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch_size)

    def check_finite(self, loss: torch.Tensor) -> None:
        """Note on the device the first step whose loss is NaN or infinite, without waiting for the device; every
        ``finite_check_every_n_steps`` steps, before any checkpoint is written and when training ends, read that
        note (one sync) and stop with a clear message, so no checkpoint holds the weights after such a step."""
        if not self.hparams.finite_check_every_n_steps:
            return
        if self._first_nonfinite is None or self._first_nonfinite.device != loss.device:
            self._first_nonfinite = torch.full((), -1, dtype=torch.long, device=loss.device)
        newly = ~torch.isfinite(loss.detach()) & (self._first_nonfinite < 0)
        self._first_nonfinite = torch.where(newly, self.global_step, self._first_nonfinite)
        if (self.global_step + 1) % self.hparams.finite_check_every_n_steps == 0:
            self.stop_if_nonfinite()

    def stop_if_nonfinite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a training loss since the start was NaN or infinite."""
        first = int(self._first_nonfinite) if self._first_nonfinite is not None else -1
        if first >= 0:
            raise NonFiniteLossError(
                f"The training loss became NaN or infinite at step {first} (seen at step {self.global_step}, epoch "
                f"{self.current_epoch}). Training stopped. Last good checkpoint: {self._last_good_checkpoint()}. "
                "Lower optimizer.lr, clip gradients (trainer.gradient_clip_val=1.0) or train in precision=32, then "
                "resume with ckpt_path=<that checkpoint>."
            )

    def on_train_end(self) -> None:
        self.stop_if_nonfinite()

    def _last_good_checkpoint(self) -> str:
        callback = getattr(self.trainer, "checkpoint_callback", None)
        for path in (getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")):
            if path and Path(path).is_file():
                return path
        return "none saved yet"

    # -- self-contained, exactly resumable checkpoints --------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.stop_if_nonfinite()
        checkpoint["lmlab"] = {
            "version": __version__,
            "task": f"{type(self).__module__}.{type(self).__qualname__}",
            "tokenizer": self.tokenizer_state,
            "config": self.run_config,
        }
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["rng_states"] = rng
        hyper = checkpoint.get("hyper_parameters")
        hf_config = self.net.checkpoint_hf_config() if hasattr(self.net, "checkpoint_hf_config") else None
        if hyper is not None and hf_config is not None:
            # a pretrained network's architecture travels with its weights: the checkpoint loads offline
            hyper["model"] = {**hyper["model"], "hf_config": hf_config}
        if getattr(self.net, "base_left_out", False):
            checkpoint["lmlab"]["base_left_out"] = leave_out_frozen(checkpoint["state_dict"], self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Applied at the first resumed batch: loader start-up between here and then draws random numbers.
        self._pending_rng = checkpoint.get("rng_states")
        record = checkpoint.get("lmlab", {}).get("base_left_out")
        if record is not None:
            # resuming a LoRA run: the pretrained weights are this task's own, read from model.name_or_path
            self.strict_loading = False
            missing = sorted(set(self.state_dict()) - set(checkpoint["state_dict"]))
            check_left_out(self, missing, record, weights_source(self.hparams.model))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:
            rng, self._pending_rng = self._pending_rng, None
            torch.set_rng_state(rng["torch"])
            random.setstate(_as_tuple(rng["python"]))
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # The last step always validates (Lightning validates when asked to stop), so every run, and every
        # trial of a sweep, ends with a metric and best/last checkpoints of its final weights.
        trainer = self.trainer
        last_step = 0 < trainer.max_steps <= trainer.global_step
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        if last_step or (last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch):
            trainer.should_stop = True


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value
