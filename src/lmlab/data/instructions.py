"""Instruction-tuning data: prompt/response pairs -> one token sequence each (cached) -> padded batches whose
loss covers the response only.

Each pair is written as one exchange of :mod:`lmlab.data.chat_format`: the tokenizer's chat template, or the plain
``User: ...`` / ``Assistant: ...`` lines that ``lmlab-chat`` speaks, followed by the end-of-text token (or,
for a tokenizer without one, the start of the next user turn), so the tuned model learns to end a reply
where ``lmlab-chat`` stops reading it. Its ids are the prompt's then the response's, encoded apart so the
boundary is exact. A batch is ``(x, y)`` as the language-model task reads it: ``y`` is ``x`` shifted by one,
with :data:`NO_LOSS` wherever the target is a prompt token or padding.

Sequences are right-padded, not packed: under causal attention no token sees the padding after it, so no
example sees another's tokens and every example's positions start at 0. Batches group examples of similar
length (sorted within pools of ``bucket_batches`` batches) to keep padding small.

A sequence holds at most ``block_size + 1`` tokens (``block_size`` inputs). A longer example is cut
(``overlong=truncate``: a prompt over ``max_prompt_share`` of the context keeps its end, next to the
response, and the response is cut at its end to fit) or left out (``overlong=skip``); both are counted and reported.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmlab.data.base import TokenizerBuilder
from lmlab.data.batching import BucketBatchSampler, pad_batch
from lmlab.data.chat_format import TEMPLATES, ChatFormat, RenderLimits
from lmlab.data.lm import LanguageModelData
from lmlab.data.storage import BatchedDataset, RaggedIds, save_ragged
from lmlab.data.tables import SplitTable, TableSource
from lmlab.errors import DataError
from lmlab.registry import register
from lmlab.tokenizers import Tokenizer

log = logging.getLogger("lmlab")

#: the target of a position that carries no loss (``F.cross_entropy``'s default ``ignore_index``)
NO_LOSS = -100
Overlong = Literal["truncate", "skip"]


class EncodedExchanges(BatchedDataset):
    """One split of exchanges (ragged ids) and the number of prompt tokens each starts with, from the cache."""

    def __init__(self, folder: Path, split: str, pad_id: int) -> None:
        self.rows, self.pad_id = RaggedIds(folder, split), pad_id
        self.prompt_lengths = torch.from_numpy(np.load(folder / f"{split}.prompt.npy"))

    @property
    def lengths(self) -> np.ndarray:
        return self.rows.lengths

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, lengths = pad_batch(self.rows.rows(indices), self.pad_id)
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].clone()
        # y[:, t] is token t + 1 of its row: a response token when prompt length - 1 <= t < length - 1
        target = torch.arange(y.size(1))
        scored = (target >= self.prompt_lengths[indices, None] - 1) & (target < lengths[:, None] - 1)
        y[~scored] = NO_LOSS
        return x, y


@register("data")
class InstructionDataModule(LanguageModelData):
    """Prompt/response pairs from a :class:`TableSource` (roles ``prompt`` and ``response``, and ``context``, an
    optional column joined to the prompt after ``context_separator``, as Alpaca's ``input``), tokenized once
    (cached). ``template``, ``user_prefix`` and ``assistant_prefix`` choose the format (:mod:`lmlab.data.chat_format`);
    ``template_limits`` bound each render of a chat template."""

    roles = ("prompt", "response")
    source: TableSource

    def __init__(
        self,
        source: TableSource,
        tokenizer: TokenizerBuilder | Tokenizer,
        block_size: int = 512,
        max_prompt_share: float = 0.5,
        overlong: Overlong = "truncate",
        template: str = "auto",
        user_prefix: str = "User: ",
        assistant_prefix: str = "Assistant: ",
        context_separator: str = "\n\n",
        bucket_batches: int = 100,
        template_limits: dict[str, Any] | None = None,
        **loading: Any,
    ) -> None:
        super().__init__(source, tokenizer, block_size, **loading)
        if not 0 < max_prompt_share < 1:
            raise DataError(
                f"data.max_prompt_share={max_prompt_share} must be in (0, 1): the share of data.block_size an overlong "
                "example's prompt keeps, leaving the rest to the response."
            )
        if overlong not in ("truncate", "skip"):
            raise DataError(f"data.overlong={overlong!r}: pick truncate or skip.")
        if template not in TEMPLATES:
            raise DataError(f"data.template={template!r}: pick one of {', '.join(TEMPLATES)}.")
        #: the most tokens an overlong example's prompt keeps (its last ones)
        self.max_prompt_length = max(1, int(block_size * max_prompt_share))
        self.overlong = overlong
        self.template, self.user_prefix, self.assistant_prefix = template, user_prefix, assistant_prefix
        self.context_separator, self.bucket_batches = context_separator, bucket_batches
        self.template_limits = RenderLimits.of(template_limits, "data.template_limits")

    # -- building the cache ---------------------------------------------------------------
    def cache_parts(self) -> dict[str, Any]:
        # the tokenizer's fingerprint leaves its chat template out: the format is keyed here
        chat_template = getattr(self.tokenizer, "chat_template", None)
        return {
            "task": "instructions",
            "block_size": self.block_size,
            "max_prompt_length": self.max_prompt_length,
            "overlong": self.overlong,
            "format": [self.template, self.user_prefix, self.assistant_prefix, self.context_separator],
            "chat_template": hashlib.sha256(chat_template.encode()).hexdigest() if chat_template else None,
        }

    def chat_format(self, tokenizer: Tokenizer) -> ChatFormat:
        return ChatFormat.for_tokenizer(
            tokenizer, self.template, self.user_prefix, self.assistant_prefix, self.template_limits
        )

    def fit_tokenizer(self, splits: dict[str, SplitTable]) -> Tokenizer:
        # a tokenizer trained here brings no chat template: the plain one writes the text it learns
        plain = ChatFormat(self.user_prefix, self.assistant_prefix)
        return self.train_tokenizer("".join(plain.exchange(p, r)) for p, r in self.pairs(splits["train"]))

    def pairs(self, table: SplitTable) -> list[tuple[str, str]]:
        """``(prompt, response)`` of every row, the context joined to the prompt; missing values are empty."""
        columns = table.columns
        prompts = [_text(value) for value in columns["prompt"]]
        if "context" in columns:
            contexts = [_text(value) for value in columns["context"]]
            prompts = [self.context_separator.join(filter(None, pair)) for pair in zip(prompts, contexts, strict=True)]
        return list(zip(prompts, (_text(value) for value in columns["response"]), strict=True))

    def encode_split(
        self, folder: Path, name: str, data: SplitTable, tokenizer: Tokenizer, meta: dict[str, Any]
    ) -> dict[str, Any]:
        pairs = self.pairs(data)
        kept = [(p, r) for p, r in pairs if p.strip() and r.strip()]
        if not kept:
            raise DataError(
                f"Every example of the {name} split ({data.origin}) has an empty prompt or response. Check "
                f"data.source.columns.prompt ('{self.source.columns['prompt']}') and data.source.columns.response "
                f"('{self.source.columns['response']}')."
            )
        chat = self.chat_format(tokenizer)
        texts = [chat.exchange(p, r) for p, r in kept]
        prompts, _ = tokenizer.encode_batch([before for before, _ in texts])
        responses, _ = tokenizer.encode_batch([reply for _, reply in texts])
        end = self.reply_end(chat, tokenizer)
        counts = {"prompt_cut": 0, "response_cut": 0, "skipped": 0}
        rows, prompt_lengths, chars = [], [], 0
        for whole_prompt, whole_response in zip(prompts, responses, strict=True):
            fitted = self.fit(whole_prompt, whole_response + end, counts)
            if fitted is None:
                continue
            prompt, response = fitted
            rows.append(prompt + response)
            prompt_lengths.append(len(prompt))
            # bits per character divide by the characters of the text scored (the end-of-text token is none)
            chars += len(tokenizer.decode([t for t in response if t != tokenizer.eos_id]))
        if not rows:
            raise DataError(
                f"Every example of the {name} split is longer than data.block_size+1={self.block_size + 1} tokens "
                "and data.overlong=skip leaves them all out. Raise data.block_size or set data.overlong=truncate."
            )
        save_ragged(folder, name, rows, tokenizer.vocab_size)
        np.save(folder / f"{name}.prompt.npy", np.asarray(prompt_lengths, dtype=np.int64))
        scored = sum(len(row) - n for row, n in zip(rows, prompt_lengths, strict=True))
        return {
            "origin": data.origin,
            "examples": len(rows),
            "empty": len(pairs) - len(kept),
            **counts,
            "tokens": scored,
            "chars": chars,
        }

    def reply_end(self, chat: ChatFormat, tokenizer: Tokenizer) -> list[int]:
        """The tokens scored after a plain-template reply, so the tuned model learns to end it where lmlab-chat
        stops: the end-of-text token, or (a tokenizer without one) the start of the next user turn. A chat
        template writes its own end of turn."""
        if not chat.plain:
            return []
        return [tokenizer.eos_id] if tokenizer.eos_id is not None else tokenizer.encode(self.user_prefix.strip())

    def fit(self, prompt: list[int], response: list[int], counts: dict[str, int]) -> tuple[list[int], list[int]] | None:
        """The example within ``block_size + 1`` tokens, as ``overlong`` says; ``None`` when it is left out."""
        room = self.block_size + 1
        if len(prompt) + len(response) <= room:
            return prompt, response
        if self.overlong == "skip":
            counts["skipped"] += 1
            return None
        if len(prompt) > self.max_prompt_length:
            prompt = prompt[-self.max_prompt_length :]
            counts["prompt_cut"] += 1
        if len(prompt) + len(response) > room:
            response = response[: room - len(prompt)]
            counts["response_cut"] += 1
        return prompt, response

    # -- serving ---------------------------------------------------------------------------
    def report(self, name: str, info: dict[str, Any]) -> None:
        where = f"{name} split ({info['origin']})"
        if info["empty"]:
            log.warning("%d example(s) of the %s with an empty prompt or response were left out.", info["empty"], where)
        if info["skipped"]:
            log.warning(
                "%d example(s) of the %s were longer than data.block_size+1=%d tokens and were left out "
                "(data.overlong=skip); raise data.block_size or set data.overlong=truncate to keep them.",
                info["skipped"],
                where,
                self.block_size + 1,
            )
        if info["prompt_cut"] or info["response_cut"]:
            log.warning(
                "Of the %d examples of the %s, %d prompt(s) were cut to their last %d tokens "
                "(data.max_prompt_share of the context) and %d response(s) were cut at data.block_size+1=%d "
                "tokens; raise data.block_size to keep more, or set data.overlong=skip to leave such examples out.",
                info["examples"],
                where,
                info["prompt_cut"],
                self.max_prompt_length,
                info["response_cut"],
                self.block_size + 1,
            )

    def open_split(self, folder: Path, name: str) -> EncodedExchanges:
        assert self.tokenizer is not None
        pad = next((i for i in (self.tokenizer.pad_id, self.tokenizer.eos_id) if i is not None), 0)
        return EncodedExchanges(folder, name, pad)

    def train_sampler(self, data: EncodedExchanges, rank: int, world: int) -> BucketBatchSampler:
        return BucketBatchSampler(data.lengths, self.batch_size, True, self.seed, self.bucket_batches, rank, world)

    def too_few_message(self, data: EncodedExchanges, world: int) -> str:
        return (
            f"The train split has {len(data)} examples: too few for {world} process(es) at "
            f"data.batch_size={self.batch_size}. Lower data.batch_size or add examples."
        )

    def eval_sampler(self, data: EncodedExchanges, rank: int, world: int) -> BucketBatchSampler:
        return BucketBatchSampler(data.lengths, self.eval_batch_size, False, rank=rank, world_size=world)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
