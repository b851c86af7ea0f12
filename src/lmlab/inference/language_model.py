"""A trained language model without the machinery that trained it: the network, its tokenizer, and sampling
text from them.

The language-model task (:class:`lmlab.tasks.lm.LanguageModelingTask`, a LightningModule) samples through
:class:`LanguageModel`, and ``lmlab-generate`` loads the task's checkpoints straight into one
(:func:`lmlab.run.checkpoint.load_language_model`): importing Lightning takes seconds, sampling a few tokens does
not. What loading a checkpoint must know about the task without importing it is declared here, beside it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lmlab.data.info import LMDataInfo
from lmlab.errors import TokenizerError
from lmlab.inference.generation import generate
from lmlab.models.lora import load_adapted, weights_source
from lmlab.registry import register_name
from lmlab.run.runtime import build_network
from lmlab.tokenizers import Tokenizer, tokenizer_from_state

log = logging.getLogger("lmlab")
#: the dotted path by which checkpoints name the language-model task (allowed without importing it)
TASK = register_name("lmlab.tasks.lm.LanguageModelingTask", "task")
#: the base class of the data modules the task reads (packed text, instruction pairs)
DATA_MODULE = "lmlab.data.lm.LanguageModelData"
#: those data modules, which its checkpoints' configs name (allowed without importing them)
DATA_MODULES = tuple(
    register_name(path, "data")
    for path in ("lmlab.data.lm.LMDataModule", "lmlab.data.instructions.InstructionDataModule")
)
#: the ``data_info`` keys the task builds its network from
NETWORK_INPUTS = ("vocab_size", "block_size", "eos_id", "tokenizer_fingerprint")
#: the keywords the task's constructor takes: a checkpoint's hyperparameters are some of these
TASK_KEYWORDS = frozenset(
    {
        "model",
        "data_info",
        "optimizer",
        "scheduler",
        "compile",
        "finite_check_every_n_steps",
        "tokenizer_state",
        "run_config",
    }
)


def _task_layout(net: nn.Module, compiled: bool) -> nn.Module:
    """A module whose state_dict names ``net``'s tensors as the task's does: ``net.*``, and again under the
    attribute the task calls it through, ``_forward.*`` (``_forward._orig_mod.*`` when the task compiles it)."""
    return nn.ModuleDict({"net": net, "_forward": nn.ModuleDict({"_orig_mod": net}) if compiled else net})


class LanguageModel:
    """A network that maps token ids to next-token logits, and the tokenizer it was trained with."""

    #: the options :meth:`infer` takes (those of :meth:`generate_text`)
    infer_options = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "num_samples", "stop_at_eos")
    #: inference writes one record per non-blank input line
    aligned_output = False

    def __init__(self, net: nn.Module, tokenizer: Tokenizer | None) -> None:
        self.net, self.tokenizer = net, tokenizer

    @classmethod
    def from_task_state(
        cls,
        hyper: Mapping[str, Any],
        tokenizer_state: dict[str, Any] | None,
        state_dict: Mapping[str, Any],
        base_left_out: dict[str, Any] | None = None,
    ) -> LanguageModel:
        """What a language-model task built from these hyperparameters, tokenizer and weights holds, built in
        the task's order (the tokenizer, then the network) so a bad checkpoint fails the same way.
        ``base_left_out``: the record of a LoRA checkpoint that left the pretrained weights out."""
        tokenizer = tokenizer_from_state(tokenizer_state) if tokenizer_state else None
        model = hyper["model"]
        net = build_network(model, LMDataInfo.from_dict(hyper["data_info"]), NETWORK_INPUTS)
        layout = _task_layout(net, bool(hyper.get("compile", False)))
        load_adapted(layout, dict(state_dict), base_left_out, weights_source(model))
        return cls(net, tokenizer)

    @property
    def context(self) -> int | None:
        """The most tokens the network reads at once (``data.block_size``); ``None`` for a recurrent network,
        which reads a prompt of any length."""
        return getattr(self.net, "block_size", None)

    def to(self, device: str | torch.device) -> LanguageModel:
        """Move the network to ``device`` (sampling runs where its parameters are)."""
        self.net.to(device)
        return self

    def generate_text(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        num_samples: int = 1,
        stop_at_eos: bool = False,
    ) -> list[str]:
        """Continue ``prompt``; with a ``seed`` the result is the same on every call. A prompt longer than the
        context is read from its last tokens that fit, with a warning."""
        ids = self.prompt_ids(prompt)
        if self.context is not None and len(ids) > self.context:
            log.warning(
                "The prompt has %d tokens, more than the model's context (data.block_size=%d): only its last %d "
                "are read.",
                len(ids),
                self.context,
                self.context,
            )
        return self._sample(ids, max_new_tokens, temperature, top_k, top_p, seed, num_samples, stop_at_eos)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids of ``prompt`` (an empty one starts from :meth:`_start_ids`); a text the tokenizer cannot
        encode, or that encodes to nothing, is a :class:`TokenizerError`."""
        if self.tokenizer is None:
            raise TokenizerError("This model has no tokenizer attached; load it from a lmlab checkpoint.")
        ids = self.tokenizer.encode(prompt, strict=True) if prompt else self._start_ids()
        if not ids:
            raise TokenizerError(f"The prompt {prompt!r} encodes to no tokens.")
        return ids

    def _sample(
        self,
        ids: list[int],
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        num_samples: int = 1,
        stop_at_eos: bool = False,
    ) -> list[str]:
        """The continuations of the prompt ``ids`` (:meth:`generate_text`)."""
        assert self.tokenizer is not None
        device = next(self.net.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
        was_training = self.net.training
        self.net.eval()
        try:
            out = generate(
                self.net,
                idx,
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                generator,
                eos_id=self.tokenizer.eos_id if stop_at_eos else None,
                suppress_ids=self.never_sampled(),
            )
        finally:
            self.net.train(was_training)
        return [self._continuation(ids, row.tolist()) for row in out]

    def infer(self, prompts: Sequence[str], **options: Any) -> list[dict[str, list[str]]]:
        """The samples of :meth:`generate_text` continuing each prompt in turn; the prompts longer than the
        context are counted in one warning."""
        encoded = [self.prompt_ids(prompt) for prompt in prompts]
        long = [len(ids) for ids in encoded if self.context is not None and len(ids) > self.context]
        if long:
            log.warning(
                "%d of %d prompts are longer than the model's context (data.block_size=%d): of each, only the last "
                "%d tokens are read (the longest has %d).",
                len(long),
                len(encoded),
                self.context,
                self.context,
                max(long),
            )
        return [{"samples": self._sample(ids, **options)} for ids in encoded]

    def _continuation(self, prompt_ids: list[int], ids: list[int]) -> str:
        """The text after the prompt, as the tokenizer writes the whole sequence: decoding the new tokens
        alone would drop the space a word tokenizer puts between the prompt's last word and the next."""
        assert self.tokenizer is not None
        whole, prompt = self.tokenizer.decode(ids), self.tokenizer.decode(prompt_ids)
        if whole.startswith(prompt):
            return whole[len(prompt) :]
        return self.tokenizer.decode(ids[len(prompt_ids) :])

    def never_sampled(self) -> list[int]:
        """The character vocabulary's unknown symbol: by construction absent from the training text."""
        unk = getattr(self.tokenizer, "unk_id", None)
        return [unk] if self.tokenizer is not None and self.tokenizer.kind == "char" and unk is not None else []

    def _start_ids(self) -> list[int]:
        """Where an empty prompt starts: end-of-text if the tokenizer has one, else a newline."""
        assert self.tokenizer is not None
        if self.tokenizer.eos_id is not None:
            return [self.tokenizer.eos_id]
        return self.tokenizer.encode("\n")
