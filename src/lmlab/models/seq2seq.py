"""Encoder-decoder networks for translation, each a :class:`~lmlab.models.base.Seq2SeqNetwork`: a GRU/LSTM
with attention and a pre-LN Transformer trained from scratch, and pretrained Hugging Face encoder-decoders."""

from __future__ import annotations

import math
from typing import Any, Unpack

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.attention import KV
from lmlab.models.base import Memory, Seq2SeqNetwork, State
from lmlab.models.choices import choice
from lmlab.models.classifiers import valid_mask
from lmlab.models.lora import leaves_base_out, with_lora
from lmlab.models.positions import Position, sinusoidal_positions
from lmlab.models.pretrained import load_pretrained_model, saved_config
from lmlab.models.recurrent import CELLS, RecurrentEncoder
from lmlab.models.transformer import Block, BlockSpec, DecoderBlock, PartChoices, init_residual_outputs, init_weights
from lmlab.registry import register


class Seq2SeqFromScratch(Seq2SeqNetwork):
    """What the networks trained from scratch share: the sizes and padding ids the data decides, and the
    source and target embeddings, which are one matrix with ``share_embeddings`` (possible only when one
    joint tokenizer makes an id mean the same token on both sides)."""

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        src_pad_id: int,
        tgt_pad_id: int,
        shared_vocabulary: bool,
        embedding_dim: int,
        share_embeddings: bool,
    ) -> None:
        super().__init__()
        if share_embeddings and not shared_vocabulary:
            raise ConfigError(
                "model.share_embeddings=true needs one vocabulary for source and target, but the data has two. "
                "Set data.joint_vocabulary=true or model.share_embeddings=false."
            )
        self.tgt_vocab_size, self.src_pad_id, self.tgt_pad_id = tgt_vocab_size, src_pad_id, tgt_pad_id
        # no padding_idx: padding is never read, and the begin token must stay trainable whatever the pad id
        self.tgt_embedding = nn.Embedding(tgt_vocab_size, embedding_dim)
        self.src_embedding = self.tgt_embedding if share_embeddings else nn.Embedding(src_vocab_size, embedding_dim)


# -- recurrent ------------------------------------------------------------------------------------------
class AdditiveAttention(nn.Module):
    """Bahdanau et al. (2015): ``score = v^T tanh(W_q q + W_k k)``. ``key`` applies ``W_k`` to the encoder
    outputs once per sentence; each step adds only its query."""

    def __init__(self, query_size: int, memory_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(memory_size, query_size)
        self.query = nn.Linear(query_size, query_size, bias=False)
        self.v = nn.Linear(query_size, 1, bias=False)

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return self.v(torch.tanh(self.query(query)[:, None] + keys)).squeeze(-1)


class MultiplicativeAttention(nn.Module):
    """Luong et al. (2015), "general": ``score = q^T W k``. ``key`` applies ``W`` to the encoder outputs once
    per sentence; each step takes dot products with its query."""

    def __init__(self, query_size: int, memory_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(memory_size, query_size, bias=False)

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return torch.bmm(keys, query[:, :, None]).squeeze(-1)


ATTENTIONS = {"additive": AdditiveAttention, "multiplicative": MultiplicativeAttention}


@register("network")
class RecurrentSeq2Seq(Seq2SeqFromScratch):
    """GRU or LSTM encoder-decoder with attention and input feeding (Luong et al. 2015).

    The encoder reads packed sequences, so padding never reaches it; a bridge (linear + tanh) maps its top
    layer's final state to the decoder's initial state, whatever the depths and directions. Each decoder
    step reads ``[embedding; previous attentional vector]``, attends over the encoder outputs with its top
    hidden state ``h`` and gives the attentional vector ``tanh(W [context; h])``, which is dropped out and
    projected to the vocabulary. With ``tie_output`` the attentional vector is ``embedding_dim`` wide, so
    the output layer can be the target embedding matrix. The embeddings keep PyTorch's Normal(0, 1) start:
    smaller vectors barely move the gates, and a two-layer model learned several times more slowly.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        src_pad_id: int,
        tgt_pad_id: int,
        shared_vocabulary: bool,
        cell: str,
        attention: str,
        embedding_dim: int = 256,
        hidden_size: int = 512,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        bidirectional: bool = True,
        dropout: float = 0.2,
        tie_output: bool = True,
        share_embeddings: bool = False,
    ) -> None:
        choice("model.cell", cell, CELLS)
        choice("model.attention", attention, ATTENTIONS)
        super().__init__(
            src_vocab_size, tgt_vocab_size, src_pad_id, tgt_pad_id, shared_vocabulary, embedding_dim, share_embeddings
        )
        self.is_lstm = cell == "lstm"
        self.state_keys = ("h", "c") if self.is_lstm else ("h",)
        self.hidden_size, self.decoder_layers = hidden_size, decoder_layers
        self.drop = nn.Dropout(dropout)
        self.encoder = RecurrentEncoder(embedding_dim, hidden_size, encoder_layers, cell, bidirectional, dropout)
        self.encoder_layers = encoder_layers
        parts = len(self.state_keys)
        self.bridge = nn.Linear(parts * self.encoder.output_size, parts * decoder_layers * hidden_size)
        self.attentional_size = embedding_dim if tie_output else hidden_size
        self.decoder = CELLS[cell](
            embedding_dim + self.attentional_size,
            hidden_size,
            num_layers=decoder_layers,
            batch_first=True,
            dropout=dropout if decoder_layers > 1 else 0.0,
        )
        self.attention = ATTENTIONS[attention](hidden_size, self.encoder.output_size)
        self.combine = nn.Linear(self.encoder.output_size + hidden_size, self.attentional_size, bias=False)
        self.head = nn.Linear(self.attentional_size, tgt_vocab_size)
        if tie_output:
            self.head.weight = self.tgt_embedding.weight

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> Memory:
        """Encoder outputs ``values (B, S, D)``, their attention ``keys (B, S, hidden)``, the source ``mask
        (B, S)`` and the decoder's ``initial`` state: ``h`` (and an LSTM's ``c``), each ``(B, layers, hidden)``."""
        values, final = self.encoder(self.drop(self.src_embedding(src)), src_lengths)
        B = src.size(0)
        # the top layer's final h (and c), both directions joined: (B, parts * D)
        top = [
            part.view(self.encoder_layers, -1, B, self.hidden_size)[-1].transpose(0, 1).reshape(B, -1)
            for part in (final if self.is_lstm else (final,))
        ]
        initial = torch.tanh(self.bridge(torch.cat(top, dim=-1))).view(B, -1, self.decoder_layers, self.hidden_size)
        return {
            "values": values,
            "keys": self.attention.key(values),
            "mask": valid_mask(src_lengths, src.size(1)),
            "initial": {key: initial[:, i] for i, key in enumerate(self.state_keys)},
        }

    def _step(self, embedded: torch.Tensor, memory: Memory, state: State | None) -> tuple[torch.Tensor, State]:
        """One decoder step from embedded tokens ``(B, E)``: the (dropped-out) attentional vector, and the state
        ``{"h", "c" (LSTM), "feed"}`` with the hidden states as ``(B, layers, hidden)``."""
        if state is None:
            state = {**memory["initial"], "feed": embedded.new_zeros(embedded.size(0), self.attentional_size)}
        hidden = tuple(state[key].transpose(0, 1).contiguous() for key in self.state_keys)  # the cell's layout
        out, hidden = self.decoder(
            torch.cat([embedded, state["feed"]], dim=-1)[:, None], hidden if self.is_lstm else hidden[0]
        )
        query = out[:, 0]
        weights = self.attention.scores(query, memory["keys"]).masked_fill(~memory["mask"], float("-inf"))
        context = torch.bmm(weights.softmax(dim=-1)[:, None], memory["values"]).squeeze(1)
        attentional = self.drop(torch.tanh(self.combine(torch.cat([context, query], dim=-1))))
        parts = hidden if self.is_lstm else (hidden,)
        new_state = {key: part.transpose(0, 1) for key, part in zip(self.state_keys, parts, strict=True)}
        return attentional, {**new_state, "feed": attentional}

    def decode_step(
        self, tokens: torch.Tensor, memory: Memory, state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        attentional, state = self._step(self.drop(self.tgt_embedding(tokens)), memory, state)
        return self.head(attentional), state

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory = self.encode(src, src_lengths)
        embedded = self.drop(self.tgt_embedding(tgt_in))
        state, outputs = None, []
        for t in range(tgt_in.size(1)):  # input feeding makes every step wait for the previous one
            attentional, state = self._step(embedded[:, t], memory, state)
            outputs.append(attentional)
        return self.head(torch.stack(outputs, dim=1))


# -- Transformer ----------------------------------------------------------------------------------------
@register("network")
class TransformerSeq2Seq(Seq2SeqFromScratch):
    """Pre-norm Transformer encoder-decoder (Vaswani et al. 2017) with fused SDPA attention.

    Token vectors are scaled by ``sqrt(n_embd)`` before positions are added. Each decoder layer projects
    the memory's keys and values once in :meth:`encode`. ``decode_step`` keeps a KV cache of the target
    prefix; with ``use_cache=False`` it keeps the prefix's tokens and runs the decoder over all of them at
    every step instead, the slow reference the cache must agree with.

    The norm, MLP, key/value heads and positions are the choices GPT offers (LayerNorm, GELU, multi-head and
    sinusoidal by default); ``n_kv_head`` sets the key/value heads of every attention, cross-attention too.
    ``positions=rope`` rotates queries and keys in the encoder's and the decoder's self-attention only
    (nothing is added to the token vectors, still scaled as above): cross-attention compares a target
    position with a source one, whose distance means nothing, and the memory already carries the source's
    positions. ``max_positions`` still bounds both sides then, so decoding knows its longest target.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        src_pad_id: int,
        tgt_pad_id: int,
        shared_vocabulary: bool,
        n_embd: int = 256,
        n_head: int = 4,
        encoder_layers: int = 3,
        decoder_layers: int = 3,
        dropout: float = 0.1,
        bias: bool = True,
        positions: Position = "sinusoidal",
        max_positions: int = 256,
        share_embeddings: bool = False,
        tie_output: bool = True,
        use_cache: bool = True,
        rope_theta: float = 10000.0,
        **parts: Unpack[PartChoices],
    ) -> None:
        spec = BlockSpec.positioned(
            positions, rope_theta, "model.positions", n_embd=n_embd, n_head=n_head, dropout=dropout, bias=bias, **parts
        )
        super().__init__(
            src_vocab_size, tgt_vocab_size, src_pad_id, tgt_pad_id, shared_vocabulary, n_embd, share_embeddings
        )
        self.max_target_positions = max_positions
        self.use_cache = use_cache
        self.embed_scale = math.sqrt(n_embd)
        if positions == "learned":
            self.src_positions = nn.Parameter(torch.empty(max_positions, n_embd))
            self.tgt_positions = nn.Parameter(torch.empty(max_positions, n_embd))
        elif positions == "sinusoidal":
            table = sinusoidal_positions(max_positions, n_embd)
            self.register_buffer("src_positions", table, persistent=False)
            self.register_buffer("tgt_positions", table, persistent=False)
        else:  # rope: nothing to add, self-attention rotates queries and keys
            self.src_positions = self.tgt_positions = None
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(Block(spec, causal=False) for _ in range(encoder_layers))
        self.ln_enc = spec.make_norm()
        self.decoder = nn.ModuleList(DecoderBlock(spec) for _ in range(decoder_layers))
        self.ln_dec = spec.make_norm()
        self.head = nn.Linear(n_embd, tgt_vocab_size, bias=False)
        if tie_output:
            self.head.weight = self.tgt_embedding.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """The shared Transformer init (Normal(0, 0.02), residual projections scaled down by the branches adding
        into their stream: two per encoder layer, three per decoder layer), but a source table of its own starts
        at std ``n_embd ** -0.5``: after the ``sqrt(n_embd)`` scale its vectors are as loud as the sine/cosine
        codes, where at 0.02 the encoder barely sees which token it reads and learns several times more slowly.
        The target table stays at 0.02: larger target vectors made training unstable in our runs, and tied to
        the output they start the model off repeating its input token."""
        init_weights(self)
        if self.src_embedding is not self.tgt_embedding:
            nn.init.normal_(self.src_embedding.weight, std=self.src_embedding.embedding_dim**-0.5)
        for p in self.parameters(recurse=False):  # learned position tables
            nn.init.normal_(p, std=0.02)
        init_residual_outputs(self.encoder)
        init_residual_outputs(self.decoder)

    def _embed(
        self, ids: torch.Tensor, table: nn.Embedding, positions: torch.Tensor | None, start: int
    ) -> torch.Tensor:
        end = start + ids.size(1)
        if end > self.max_target_positions:
            raise ValueError(f"A sequence of {end} tokens exceeds model.max_positions ({self.max_target_positions}).")
        x = table(ids) * self.embed_scale
        return self.drop(x if positions is None else x + positions[start:end])

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> Memory:
        """The source ``mask (B, S)`` and, per decoder layer, the memory's cross-attention keys and values,
        each ``(B, n_kv_head, S, head_size)``."""
        mask = valid_mask(src_lengths, src.size(1))
        x = self._embed(src, self.src_embedding, self.src_positions, 0)
        for block in self.encoder:
            x, _ = block(x, key_mask=mask)
        x = self.ln_enc(x)
        return {"mask": mask, "keys_values": [block.cross.memory_kv(x) for block in self.decoder]}

    def _decode(self, tgt: torch.Tensor, memory: Memory, past: list[KV] | None = None) -> tuple[torch.Tensor, list[KV]]:
        """Logits of target tokens ``(B, T)`` that continue the cached prefix ``past`` (one KV per layer)."""
        start = past[0][0].size(2) if past else 0
        x = self._embed(tgt, self.tgt_embedding, self.tgt_positions, start)
        present = []
        for i, block in enumerate(self.decoder):
            x, kv = block(x, memory["keys_values"][i], memory["mask"], past[i] if past else None)
            present.append(kv)
        return self.head(self.ln_dec(x)), present

    def decode_step(
        self, tokens: torch.Tensor, memory: Memory, state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        """The state is the self-attention KV cache, one ``(k, v)`` per layer, each ``(B, n_kv_head, t,
        head_size)``; without the cache it is the prefix's tokens ``(B, t)``."""
        if self.use_cache:
            logits, cache = self._decode(tokens[:, None], memory, state)
            return logits[:, -1], cache
        prefix = tokens[:, None] if state is None else torch.cat([state, tokens[:, None]], dim=1)
        logits, _ = self._decode(prefix, memory)
        return logits[:, -1], prefix

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        logits, _ = self._decode(tgt_in, self.encode(src, src_lengths))
        return logits


# -- pretrained -----------------------------------------------------------------------------------------
@register("network")
class PretrainedSeq2Seq(Seq2SeqNetwork):
    """A pretrained Hugging Face encoder-decoder (T5, BART, Marian, mBART, ...) from a hub name or a local
    folder, fine-tuned whole.

    It reads the ids of its own tokenizer (``tokenizer=pretrained`` with the same name or folder): the
    tokenizer's end token must be the model's, and every id must fit the model's embedding table. The
    pipeline's begin token (the end token) is swapped for the model's decoder start token, and logits are cut
    to the tokenizer's vocabulary where the model pads its table beyond it (T5 keeps 28 unused rows).
    Decoding keeps the model's own key/value cache as the state; beam search reorders it with the cache's
    ``reorder_cache``. ``lora`` trains LoRA adapters instead of every weight (:mod:`lmlab.models.lora`).
    ``hf_config`` is set by lmlab checkpoints (see :mod:`lmlab.models.pretrained`).
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        src_pad_id: int,
        tgt_pad_id: int,
        eos_id: int,
        shared_vocabulary: bool,
        name_or_path: str,
        lora: dict[str, Any] | None = None,
        hf_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        model = load_pretrained_model("AutoModelForSeq2SeqLM", name_or_path, "hf_seq2seq", hf_config)
        self.model = with_lora(model, lora, "hf_seq2seq")
        #: its checkpoints leave the frozen pretrained weights out (:mod:`lmlab.models.lora`)
        self.base_left_out = leaves_base_out(lora)
        config = self.model.config
        rows = self.model.get_output_embeddings().weight.size(0)
        model_eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        fix = (
            f"Use the model's own tokenizer: tokenizer=pretrained tokenizer.name_or_path={name_or_path} with its "
            "end and padding tokens (tokenizer.eos_token, tokenizer.pad_token)."
        )
        if not shared_vocabulary:
            raise ConfigError(f"model=hf_seq2seq reads both languages with one vocabulary, but the data has two. {fix}")
        if max(src_vocab_size, tgt_vocab_size) > rows:
            raise ConfigError(
                f"The tokenizer has {max(src_vocab_size, tgt_vocab_size)} tokens but '{name_or_path}' embeds only "
                f"{rows}. {fix}"
            )
        if eos_id not in model_eos:
            raise ConfigError(
                f"The tokenizer's end token has id {eos_id} but '{name_or_path}' ends sentences with id "
                f"{model_eos[0]}. {fix}"
            )
        start = config.decoder_start_token_id
        self.start_id = int(start if start is not None else config.pad_token_id)
        self.tgt_vocab_size, self.src_pad_id, self.tgt_pad_id = tgt_vocab_size, src_pad_id, tgt_pad_id
        self.max_target_positions = getattr(config, "max_position_embeddings", None)

    def checkpoint_hf_config(self) -> dict[str, Any] | None:
        return None if self.base_left_out else saved_config(self.model)

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> Memory:
        """The encoder's last hidden states ``(B, S, H)`` and the source mask ``(B, S)``."""
        mask = valid_mask(src_lengths, src.size(1)).long()
        hidden = self.model.get_encoder()(input_ids=src, attention_mask=mask).last_hidden_state
        return {"hidden": hidden, "mask": mask}

    def _logits(self, memory: Memory, tgt: torch.Tensor, past: Any, use_cache: bool) -> tuple[torch.Tensor, Any]:
        from transformers.modeling_outputs import BaseModelOutput

        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=memory["hidden"]),
            attention_mask=memory["mask"],
            decoder_input_ids=tgt,
            past_key_values=past,
            use_cache=use_cache,
        )
        return out.logits[..., : self.tgt_vocab_size], out.past_key_values

    def decode_step(
        self, tokens: torch.Tensor, memory: Memory, state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        """The state is the model's key/value cache (self- and cross-attention)."""
        if state is None:
            tokens = torch.full_like(tokens, self.start_id)
        logits, cache = self._logits(memory, tokens[:, None], state, use_cache=True)
        return logits[:, -1], cache

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        tgt_in = torch.cat([torch.full_like(tgt_in[:, :1], self.start_id), tgt_in[:, 1:]], dim=1)
        logits, _ = self._logits(self.encode(src, src_lengths), tgt_in, None, use_cache=False)
        return logits
