"""What every task shares: building its network from config, optimizers and schedules, finite-loss
checks, exact-resume RNG state, and the extras that make a checkpoint self-contained."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from torch import nn

from lmlab import __version__
from lmlab.errors import NonFiniteLossError
from lmlab.runtime import build_network
from lmlab.tokenizers import Tokenizer, tokenizer_from_state


class TaskModule(L.LightningModule):
    """Base LightningModule. Subclasses implement :meth:`build_network` and the step methods.

    Hyperparameters are plain containers only (no networks, partials or config objects), so
    checkpoints load with ``torch.load(weights_only=True)``.
    """

    #: data_info keys the network is built from, passed to the model when its constructor takes them
    network_inputs: tuple[str, ...] = ("vocab_size",)
    #: the data module class (dotted path) this task reads; the config check rejects other data options
    data_module: str = "lmlab.data.base.TaskDataModule"
    #: data_info keys (besides the tokenizer) that must be the same in a checkpoint and the data it resumes on
    fixed_by_checkpoint: tuple[str, ...] = ()
    #: data settings the trained network depends on: evaluating on other data keeps the checkpoint's
    checkpoint_data_keys: tuple[str, ...] = ()

    def __init__(
        self,
        model: dict[str, Any],
        data_info: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        compile: bool = False,
        finite_check_every_n_steps: int = 1,
        tokenizer_state: dict[str, Any] | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer_state", "run_config"])
        self.tokenizer_state, self.run_config = tokenizer_state, run_config
        self.tokenizer: Tokenizer | None = tokenizer_from_state(tokenizer_state) if tokenizer_state else None
        self.net = self.build_network(model, data_info)
        self._forward = torch.compile(self.net) if compile else self.net
        self._pending_rng: dict[str, Any] | None = None

    def build_network(self, model: dict[str, Any], data_info: dict[str, Any]) -> nn.Module:
        return build_network(model, data_info, self.network_inputs)

    def batch_counts(self, batch: Any) -> tuple[int, int]:
        """``(examples, tokens)`` of a training batch, for throughput: the input tensor's rows and elements."""
        inputs = batch[0] if isinstance(batch, list | tuple) else batch["input_ids"]
        return inputs.size(0), inputs.numel()

    def datamodule_kwargs(self) -> dict[str, Any]:
        """What a data module needs to serve data the way this trained task expects (its tokenizer)."""
        return {"tokenizer": self.tokenizer}

    # -- optimization ---------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        opt_cfg = dict(self.hparams.optimizer or {})
        if not opt_cfg:
            raise ValueError("No optimizer configured: set the optimizer group (e.g. optimizer=adamw).")
        weight_decay = opt_cfg.pop("weight_decay", 0.0)
        decay = [p for p in self.net.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.net.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = hydra.utils.instantiate(opt_cfg, _partial_=True)(groups)
        if not self.hparams.scheduler:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        schedule = hydra.utils.instantiate(self.hparams.scheduler, _partial_=True)(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop with a clear message (and no corrupted checkpoint) when the loss is NaN or infinite."""
        every = self.hparams.finite_check_every_n_steps
        if every and self.global_step % every == 0 and not bool(torch.isfinite(loss)):
            raise NonFiniteLossError(
                f"The training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}). "
                f"Training stopped. Last good checkpoint: {self._last_good_checkpoint()}. Lower optimizer.lr, "
                "clip gradients (trainer.gradient_clip_val=1.0) or train in precision=32, then resume with "
                "ckpt_path=<that checkpoint>."
            )

    def _last_good_checkpoint(self) -> str:
        callback = getattr(self.trainer, "checkpoint_callback", None)
        for path in (getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")):
            if path and Path(path).is_file():
                return path
        return "none saved yet"

    # -- self-contained, exactly resumable checkpoints --------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
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
        if hyper is not None and callable(getattr(self.net, "checkpoint_hf_config", None)):
            # a pretrained network's architecture travels with its weights: the checkpoint loads offline
            hyper["model"] = {**hyper["model"], "hf_config": self.net.checkpoint_hf_config()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Applied at the first resumed batch: loader start-up between here and then draws random numbers.
        self._pending_rng = checkpoint.get("rng_states")

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
