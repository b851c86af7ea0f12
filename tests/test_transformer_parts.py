"""The Transformer's composable parts: every norm x MLP x position x key/value-head choice of GPT decodes
with its KV cache exactly as a full forward pass does; grouped- and multi-query attention shrink the key and
value projections; RMSNorm, SwiGLU and RoPE agree with independent hand computations, and RoPE scores depend
only on relative positions; bad choices name the config key; the checkpoint fixtures still give their logits.
The Transformer classifier and the seq2seq Transformer offer the same choices: each builds the parts it names
(rope in self-attention only), every combination runs, decodes with its cache and ignores padding, the
defaults of the signatures and of ``conf/model`` are today's networks, and the start-up check takes the keys."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from lmlab.config.schema import config_dir, validate_config
from lmlab.errors import ConfigError
from lmlab.inference.generation import generate
from lmlab.models import GPT, TransformerClassifier
from lmlab.models.attention import CrossAttention, SelfAttention
from lmlab.models.mlp import GeluMLP, SwiGLU, mlp_hidden_size
from lmlab.models.norms import make_norm
from lmlab.models.positions import RotaryEmbedding
from lmlab.models.seq2seq import TransformerSeq2Seq
from lmlab.models.transformer import BlockSpec
from lmlab.run.runtime import build_network

VOCAB, N_HEAD, N_EMBD = 23, 4, 32
FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
COMBINATIONS = list(
    itertools.product(["layernorm", "rmsnorm"], ["gelu", "swiglu"], ["learned", "sinusoidal", "rope"], [N_HEAD, 2, 1])
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors this small gain nothing from intra-op threads, and lose much to them on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gpt(**choices) -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=VOCAB, block_size=24, n_layer=2, n_head=N_HEAD, n_embd=N_EMBD, **choices).eval()


def _tokens(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- the KV cache under every combination ---------------------------------------------------------------
@pytest.mark.parametrize(("norm", "mlp", "position", "n_kv_head"), COMBINATIONS)
def test_cached_decoding_equals_the_full_forward_pass(norm: str, mlp: str, position: str, n_kv_head: int) -> None:
    model = _gpt(norm=norm, mlp=mlp, position=position, n_kv_head=n_kv_head)
    idx = _tokens()
    with torch.no_grad():
        full, _ = model(idx)
        # a prefix, single tokens, then a multi-token chunk after a prefix (the offset causal mask)
        outs, state = [], None
        for lo, hi in [(0, 5), (5, 6), (6, 7), (7, 12), (12, 16)]:
            logits, state = model(idx[:, lo:hi], state, return_state=True)
            outs.append(logits)
        torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=0)
        assert all(k.shape == v.shape == (2, n_kv_head, 16, N_EMBD // N_HEAD) for k, v in state)
        # greedy generation through the cache picks what recomputing the whole text each step picks
        prompt = idx[:, :4]
        cached = generate(model, prompt, 8, temperature=0.0)
        recomputed = prompt
        for _ in range(8):
            recomputed = torch.cat([recomputed, model(recomputed)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, recomputed)


def test_every_position_scheme_sees_word_order() -> None:
    """Causal attention without positions is blind to the order of the prefix: the last token's logits after
    ``a b c`` and ``b a c`` would be equal. Each scheme tells them apart."""
    for position in ["learned", "sinusoidal", "rope"]:
        model = _gpt(position=position)
        with torch.no_grad():
            logits, _ = model(torch.tensor([[5, 7, 3], [7, 5, 3]]))
        # small at the init's near-uniform attention, but far above rounding error
        assert (logits[0, -1] - logits[1, -1]).abs().max() > 1e-5, position
        assert ("wpe.weight" in model.state_dict()) == (position == "learned")


# -- grouped- and multi-query attention -----------------------------------------------------------------
@pytest.mark.parametrize("n_kv_head", [N_HEAD, 2, 1])
def test_key_value_heads_set_the_projection_sizes(n_kv_head: int) -> None:
    model = _gpt(n_kv_head=n_kv_head)
    head_size = N_EMBD // N_HEAD
    qkv = model.blocks[0].attn.qkv
    assert qkv.weight.shape == (N_EMBD + 2 * n_kv_head * head_size, N_EMBD)
    assert qkv.bias.shape == (N_EMBD + 2 * n_kv_head * head_size,)
    per_layer_fewer = 2 * (N_HEAD - n_kv_head) * head_size * (N_EMBD + 1)  # k and v rows, weights and biases
    full = sum(p.numel() for p in _gpt().parameters())
    assert full - sum(p.numel() for p in model.parameters()) == 2 * per_layer_fewer


def test_grouped_query_attention_equals_multi_head_with_copied_key_value_heads() -> None:
    """A group's query heads share one key/value head: a multi-head model whose key/value heads are copies
    (head h gets head h // group) computes the same function."""
    gqa, mha = _gpt(n_kv_head=2), _gpt()
    head_size, group = N_EMBD // N_HEAD, N_HEAD // 2
    state = gqa.state_dict()
    for name, tensor in list(state.items()):
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
            q, k, v = tensor.split([N_EMBD, 2 * head_size, 2 * head_size])
            heads = [t.unflatten(0, (2, head_size)).repeat_interleave(group, dim=0).flatten(0, 1) for t in (k, v)]
            state[name] = torch.cat([q, *heads])
    mha.load_state_dict(state)
    idx = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(mha(idx)[0], gqa(idx)[0], atol=1e-5, rtol=0)


# -- RMSNorm, SwiGLU, RoPE against hand computations ----------------------------------------------------
def test_rmsnorm_rescales_by_the_root_mean_square() -> None:
    x = torch.randn(3, 5, 8)
    norm = make_norm("rmsnorm", 8, bias=True, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
        expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
        torch.testing.assert_close(norm(x), expected)
    assert [name for name, _ in norm.named_parameters()] == ["weight"], "RMSNorm has no bias"


def test_swiglu_is_down_of_silu_gate_times_up() -> None:
    torch.manual_seed(0)
    mlp = SwiGLU(8, 12, dropout=0.0, bias=False)
    x = torch.randn(2, 3, 8)
    gate, up = x @ mlp.gate.weight.T, x @ mlp.up.weight.T
    expected = (gate / (1 + torch.exp(-gate)) * up) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), expected)


def test_mlp_hidden_sizes() -> None:
    assert mlp_hidden_size("gelu", 128, None, 256) == 512
    assert mlp_hidden_size("swiglu", 4096, None, 256) == 11008  # Llama-2 7B
    assert mlp_hidden_size("swiglu", 128, None, 32) == 352  # 341 rounded up
    assert mlp_hidden_size("swiglu", 128, 100, 32) == 100
    model = _gpt(mlp="swiglu", mlp_hidden=40)
    assert model.blocks[0].mlp.gate.weight.shape == (40, N_EMBD)


def _rope_by_complex_numbers(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Features ``i`` and ``i + d/2`` as one complex number, multiplied by ``exp(1j * position * theta **
    (-2i / d))``, in float64."""
    d = x.size(-1)
    pairs = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())
    frequencies = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rotated = pairs * torch.polar(torch.ones((), dtype=torch.float64), positions.double()[:, None] * frequencies)
    return torch.cat([rotated.real, rotated.imag], dim=-1).float()


def test_rope_agrees_with_complex_rotation_at_every_offset() -> None:
    q, k = torch.randn(2, 3, 7, 16), torch.randn(2, 1, 7, 16)
    rope = RotaryEmbedding(16, theta=500.0)
    for start in [0, 1, 9]:
        rq, rk = rope(q, k, start)
        positions = torch.arange(start, start + 7)
        torch.testing.assert_close(rq, _rope_by_complex_numbers(q, positions, 500.0), atol=1e-5, rtol=0)
        torch.testing.assert_close(rk, _rope_by_complex_numbers(k, positions, 500.0), atol=1e-5, rtol=0)


def test_rope_scores_depend_only_on_relative_positions() -> None:
    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    rope = RotaryEmbedding(8, theta=10000.0)
    scores = [torch.einsum("bhqd,bhkd->bhqk", *rope(q, k, start)) for start in [0, 5, 40]]
    torch.testing.assert_close(scores[1], scores[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(scores[2], scores[0], atol=1e-4, rtol=0)
    plain = torch.einsum("bhqd,bhkd->bhqk", q, k)
    assert not torch.allclose(scores[0], plain, atol=1e-3), "the rotation changes the scores"
    assert torch.allclose(scores[0].diagonal(dim1=-2, dim2=-1), plain.diagonal(dim1=-2, dim2=-1), atol=1e-5)


def test_rope_attention_matches_a_reference_computation() -> None:
    """One causal layer's attention output against softmax(q k^T / sqrt(d)) v written out with the complex
    reference rotation."""
    model = _gpt(position="rope", n_kv_head=2)
    attn = model.blocks[0].attn
    x = torch.randn(1, 5, N_EMBD)
    with torch.no_grad():
        out, _ = attn(x)
        q, k, v = attn.qkv(x).split([N_EMBD, 16, 16], dim=2)
        q, k, v = (t.view(1, 5, -1, 8).transpose(1, 2) for t in (q, k, v))
        positions = torch.arange(5)
        q, k = _rope_by_complex_numbers(q, positions, 10000.0), _rope_by_complex_numbers(k, positions, 10000.0)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
        y = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(1, 5, N_EMBD)
        torch.testing.assert_close(out, attn.proj(y), atol=1e-5, rtol=0)


# -- the default choices are today's GPT ----------------------------------------------------------------
def test_default_choices_keep_the_state_dict_layout() -> None:
    shapes = {name: tuple(t.shape) for name, t in _gpt().state_dict().items()}
    head = N_EMBD * 4
    expected_block = {
        "ln_1.weight": (N_EMBD,),
        "ln_1.bias": (N_EMBD,),
        "attn.qkv.weight": (3 * N_EMBD, N_EMBD),
        "attn.qkv.bias": (3 * N_EMBD,),
        "attn.proj.weight": (N_EMBD, N_EMBD),
        "attn.proj.bias": (N_EMBD,),
        "ln_2.weight": (N_EMBD,),
        "ln_2.bias": (N_EMBD,),
        "mlp.fc.weight": (head, N_EMBD),
        "mlp.fc.bias": (head,),
        "mlp.proj.weight": (N_EMBD, head),
        "mlp.proj.bias": (N_EMBD,),
    }
    expected = {"wte.weight": (VOCAB, N_EMBD), "wpe.weight": (24, N_EMBD)}
    for layer in range(2):
        expected |= {f"blocks.{layer}.{name}": shape for name, shape in expected_block.items()}
    expected |= {"ln_f.weight": (N_EMBD,), "ln_f.bias": (N_EMBD,), "lm_head.weight": (VOCAB, N_EMBD)}
    assert shapes == expected and list(shapes) == list(expected)


def test_residual_projections_get_the_scaled_init() -> None:
    torch.manual_seed(0)
    model = GPT(vocab_size=VOCAB, block_size=8, n_layer=8, n_head=2, n_embd=64, mlp="swiglu")
    block = model.blocks[0]
    scaled = 0.02 / math.sqrt(2 * 8)
    for linear in [block.attn.proj, block.mlp.down]:
        assert abs(linear.weight.std().item() - scaled) < 0.2 * scaled
    for linear in [block.attn.qkv, block.mlp.gate, block.mlp.up]:
        assert abs(linear.weight.std().item() - 0.02) < 0.2 * 0.02


# -- bad choices -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("choices", "key", "valid"),
    [
        ({"norm": "batchnorm"}, "model.norm", "layernorm, rmsnorm"),
        ({"mlp": "relu"}, "model.mlp", "gelu, swiglu"),
        ({"position": "alibi"}, "model.position", "learned, sinusoidal, rope"),
        ({"n_kv_head": 3}, "model.n_kv_head", "null, 1, 2, 4"),
        ({"n_kv_head": 0}, "model.n_kv_head", "null, 1, 2, 4"),
        ({"position": "rope", "n_embd": 12, "n_head": 4}, "model.position=rope", "must be even"),
        ({"position": "rope", "rope_theta": 0.0}, "model.rope_theta", "positive"),
        ({"mlp_hidden": 0}, "model.mlp_hidden", "positive"),
        ({"norm_eps": 0.0}, "model.norm_eps", "positive"),
    ],
)
def test_bad_choices_name_the_key_and_the_valid_values(choices: dict, key: str, valid: str) -> None:
    settings = {"vocab_size": VOCAB, "block_size": 8, "n_layer": 1, "n_head": N_HEAD, "n_embd": N_EMBD, **choices}
    with pytest.raises(ConfigError) as info:
        GPT(**settings)
    assert key in str(info.value) and valid in str(info.value)


def test_block_spec_defaults_are_the_original_transformer() -> None:
    spec = BlockSpec(n_embd=N_EMBD, n_head=N_HEAD, dropout=0.0, bias=True)
    assert (spec.norm, spec.mlp, spec.n_kv_head, spec.rope_theta) == ("layernorm", "gelu", None, None)
    assert isinstance(spec.make_norm(), torch.nn.LayerNorm)


# -- checkpoints of today's code ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lm_gpt", "cls_transformer", "mt_transformer"])
def test_transformer_fixtures_load_strictly_and_give_their_logits(name: str) -> None:
    checkpoint = torch.load(FIXTURES / f"{name}.ckpt", map_location="cpu", weights_only=False)
    hyper = checkpoint["hyper_parameters"]
    inputs = {"lm": ("vocab_size", "block_size"), "cls": ("vocab_size", "num_classes", "pad_id", "max_length")}
    seq2seq = ("src_vocab_size", "tgt_vocab_size", "src_pad_id", "tgt_pad_id", "eos_id", "shared_vocabulary")
    net = build_network(hyper["model"], hyper["data_info"], inputs.get(name.split("_")[0], seq2seq))
    weights = {k[len("net.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(weights, strict=True)
    recorded = torch.load(FIXTURES / f"{name}.logits.pt")
    with torch.no_grad():
        out = net.eval()(*recorded["inputs"])
    logits = out[0] if name.startswith("lm_") else out
    # recorded on another CPU, whose kernels may round the last bit differently: the same bound as the compat test
    assert torch.allclose(logits, recorded["logits"], rtol=0, atol=1e-6), (logits - recorded["logits"]).abs().max()


# -- the same choices on the Transformer classifier and the seq2seq Transformer -------------------------
CLASSES, PAD, TGT_VOCAB = 3, 0, VOCAB + 3
#: the settings the encoder and encoder-decoder took over from GPT, besides ``positions``
PART_KEYS = ("norm", "norm_eps", "mlp", "mlp_hidden", "mlp_multiple_of", "n_kv_head", "rope_theta")


def _classifier(**choices) -> TransformerClassifier:
    torch.manual_seed(0)
    sizes = {"n_layer": 2, "n_head": N_HEAD, "n_embd": N_EMBD, "dropout": 0.0, **choices}
    return TransformerClassifier(VOCAB, CLASSES, PAD, max_length=16, **sizes).eval()


def _seq2seq(**choices) -> TransformerSeq2Seq:
    torch.manual_seed(0)
    sizes = {"n_head": N_HEAD, "n_embd": N_EMBD, "encoder_layers": 2, "decoder_layers": 2, "dropout": 0.0, **choices}
    return TransformerSeq2Seq(VOCAB, TGT_VOCAB, PAD, PAD, False, max_positions=24, **sizes).eval()


BUILDERS = {"classifier": _classifier, "seq2seq": _seq2seq}


def _texts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two right-padded texts ``(2, 12)`` of 12 and 7 tokens."""
    ids, lengths = _tokens(length=12), torch.tensor([12, 7])
    return ids.masked_fill(torch.arange(12)[None, :] >= lengths[:, None], PAD), lengths


def _pairs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two right-padded sources ``(2, 10)`` of 10 and 6 tokens, and target inputs ``(2, 8)``."""
    src, src_lengths = _tokens(length=10, seed=2), torch.tensor([10, 6])
    src = src.masked_fill(torch.arange(10)[None, :] >= src_lengths[:, None], PAD)
    return src, src_lengths, _tokens(length=8, seed=3)


def _outputs(net: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return net(*_texts()) if isinstance(net, TransformerClassifier) else net(*_pairs())


def _parts(net: nn.Module, *kinds: type) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, kinds)]


def _encoder_outputs(net: nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """What the encoder's final norm gives for ``ids``, ``(B, T, C)`` (the classifier's only for mean pooling,
    where no [CLS] vector comes first)."""
    outputs = []
    classifier = isinstance(net, TransformerClassifier)
    hook = (net.ln_f if classifier else net.ln_enc).register_forward_hook(lambda *args: outputs.append(args[2]))
    with torch.no_grad():
        net(ids, lengths) if classifier else net.encode(ids, lengths)
    hook.remove()
    return outputs[0]


@pytest.mark.parametrize(("norm", "mlp", "positions", "n_kv_head"), COMBINATIONS)
def test_every_combination_classifies_whatever_the_padding(norm: str, mlp: str, positions: str, n_kv_head: int) -> None:
    net = _classifier(norm=norm, mlp=mlp, positions=positions, n_kv_head=n_kv_head)
    ids, lengths = _texts()
    with torch.no_grad():
        logits = net(ids, lengths)
        alone = net(ids[1:, :7], lengths[1:])
    assert logits.shape == (2, CLASSES) and logits.isfinite().all()
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("norm", "mlp", "positions", "n_kv_head"), COMBINATIONS)
def test_every_combination_translates_step_by_step_as_teacher_forced(
    norm: str, mlp: str, positions: str, n_kv_head: int
) -> None:
    net = _seq2seq(norm=norm, mlp=mlp, positions=positions, n_kv_head=n_kv_head)
    src, src_lengths, tgt_in = _pairs()
    with torch.no_grad():
        forced = net(src, src_lengths, tgt_in)
        memory, state, steps = net.encode(src, src_lengths), None, []
        for t in range(tgt_in.size(1)):
            logits, state = net.decode_step(tgt_in[:, t], memory, state)
            steps.append(logits)
        alone = net(src[1:, :6], src_lengths[1:], tgt_in[1:])
    assert forced.shape == (2, 8, TGT_VOCAB) and forced.isfinite().all()
    torch.testing.assert_close(torch.stack(steps, dim=1), forced, atol=1e-5, rtol=0)
    torch.testing.assert_close(forced[1:], alone, atol=1e-5, rtol=0)
    head_size = N_EMBD // N_HEAD
    assert all(k.shape == v.shape == (2, n_kv_head, 8, head_size) for k, v in state)
    assert all(k.shape == v.shape == (2, n_kv_head, 10, head_size) for k, v in memory["keys_values"])


@pytest.mark.parametrize("model", list(BUILDERS))
def test_each_choice_builds_the_parts_it_names(model: str) -> None:
    build, head_size = BUILDERS[model], N_EMBD // N_HEAD
    default = build()

    def kinds(net: nn.Module, *among: type) -> set[type]:
        return {type(m) for m in _parts(net, *among)}

    assert kinds(default, nn.LayerNorm, nn.RMSNorm) == {nn.LayerNorm}
    assert kinds(build(norm="rmsnorm"), nn.LayerNorm, nn.RMSNorm) == {nn.RMSNorm}
    assert kinds(default, GeluMLP, SwiGLU) == {GeluMLP}
    swiglu = _parts(build(mlp="swiglu", mlp_hidden=40), GeluMLP, SwiGLU)
    assert swiglu and all(isinstance(m, SwiGLU) and m.gate.weight.shape == (40, N_EMBD) for m in swiglu)
    for n_kv_head in [N_HEAD, 2, 1]:
        net = build(n_kv_head=n_kv_head)
        kv_rows = 2 * n_kv_head * head_size
        assert all(m.qkv.weight.shape == (N_EMBD + kv_rows, N_EMBD) for m in _parts(net, SelfAttention))
        assert all(m.kv.weight.shape == (kv_rows, N_EMBD) for m in _parts(net, CrossAttention))
    assert all(m.rotary is None for m in _parts(default, SelfAttention))
    rope = build(positions="rope", rope_theta=500.0)
    rotaries = [m.rotary for m in _parts(rope, SelfAttention)]
    assert rotaries and all(isinstance(r, RotaryEmbedding) and r.theta == 500.0 for r in rotaries)
    assert not any(_parts(cross, RotaryEmbedding) for cross in _parts(rope, CrossAttention))
    tables = [name for name in dict(rope.named_parameters()) | dict(rope.named_buffers()) if "positions" in name]
    assert tables == [], "rotary positions add nothing to the token vectors"


@pytest.mark.parametrize("model", list(BUILDERS))
def test_every_position_scheme_sees_word_order_in_the_encoder(model: str) -> None:
    """Bidirectional attention without positions is blind to word order: the encoder's outputs for a text with
    its first and last tokens swapped would be its outputs swapped. Each scheme tells the two texts apart."""
    ids, swap, lengths = torch.tensor([[5, 7, 3, 9, 11, 2]]), torch.tensor([5, 1, 2, 3, 4, 0]), torch.tensor([6])
    for positions in ["learned", "sinusoidal", "rope"]:
        net = (
            _classifier(positions=positions, pooling="mean") if model == "classifier" else _seq2seq(positions=positions)
        )
        swapped = _encoder_outputs(net, ids[:, swap], lengths)
        # rope's share is small under the seq2seq init's near-uniform attention, but far above rounding error
        assert (swapped - _encoder_outputs(net, ids, lengths)[:, swap]).abs().max() > 1e-6, positions


@pytest.mark.parametrize(
    ("model", "config"), [("classifier", "transformer_encoder"), ("seq2seq", "transformer_seq2seq")]
)
def test_default_choices_are_todays_network(model: str, config: str) -> None:
    """The new settings at their signature defaults or at the values of ``conf/model`` build the network the
    model built before they existed: the same parameters, initialized alike, and the same outputs."""
    yaml = OmegaConf.load(Path(config_dir()) / "model" / f"{config}.yaml")
    before = BUILDERS[model]()
    for settings in [{}, {key: yaml[key] for key in (*PART_KEYS, "positions")}]:
        after = BUILDERS[model](**settings)
        assert list(after.state_dict()) == list(before.state_dict())
        assert all(torch.equal(t, before.state_dict()[name]) for name, t in after.state_dict().items())
        assert torch.equal(_outputs(after), _outputs(before))


@pytest.mark.parametrize("model", list(BUILDERS))
@pytest.mark.parametrize(
    ("choices", "key", "valid"),
    [
        ({"norm": "batchnorm"}, "model.norm", "layernorm, rmsnorm"),
        ({"mlp": "relu"}, "model.mlp", "gelu, swiglu"),
        ({"positions": "alibi"}, "model.positions", "learned, sinusoidal, rope"),
        ({"n_kv_head": 3}, "model.n_kv_head", "null, 1, 2, 4"),
        ({"positions": "rope", "n_embd": 12}, "model.positions=rope", "must be even"),
        ({"positions": "rope", "rope_theta": -1.0}, "model.rope_theta", "positive"),
        ({"mlp_multiple_of": 0}, "model.mlp_multiple_of", "positive"),
        ({"norm_eps": 0.0}, "model.norm_eps", "positive"),
    ],
)
def test_bad_choices_on_the_encoder_models_name_the_key(model: str, choices: dict, key: str, valid: str) -> None:
    with pytest.raises(ConfigError) as info:
        BUILDERS[model](**choices)
    assert key in str(info.value) and valid in str(info.value)


@pytest.mark.parametrize(
    ("task", "model", "positions", "inputs"),
    [
        ("lm", "gpt", "position", {"vocab_size": VOCAB, "block_size": 16}),
        (
            "classification",
            "transformer_encoder",
            "positions",
            {"vocab_size": VOCAB, "num_classes": 2, "pad_id": 0, "max_length": 16},
        ),
        (
            "translation",
            "transformer_seq2seq",
            "positions",
            {
                "src_vocab_size": VOCAB,
                "tgt_vocab_size": VOCAB,
                "src_pad_id": 0,
                "tgt_pad_id": 0,
                "shared_vocabulary": True,
            },
        ),
    ],
)
def test_the_start_up_check_takes_the_part_keys_and_their_ranges(
    task: str, model: str, positions: str, inputs: dict, make_cfg
) -> None:
    """Every part key is a key of each model's config, set from the command line and checked against its
    range before any data is read; a choice outside its options fails as the network is built, naming its key."""
    base = [f"task={task}", f"model={model}", "model.n_embd=32", "model.n_head=4"]
    chosen = ["model.norm=rmsnorm", "model.mlp=swiglu", f"model.{positions}=rope", "model.n_kv_head=2"]
    cfg = make_cfg([*base, *chosen, "model.rope_theta=500", "model.mlp_hidden=48", "model.norm_eps=1e-6"])
    validate_config(cfg)
    net = build_network(OmegaConf.to_container(cfg.model), inputs, tuple(inputs))
    attn, mlp, norm = _parts(net, SelfAttention)[0], _parts(net, SwiGLU)[0], _parts(net, nn.RMSNorm)[0]
    assert attn.qkv.weight.shape[0] == N_EMBD + 2 * 2 * (N_EMBD // N_HEAD) and attn.rotary.theta == 500.0
    assert mlp.gate.weight.shape[0] == 48 and norm.eps == 1e-6
    for override, message in [
        ("model.n_kv_head=0", "model.n_kv_head=0: it must be an integer >= 1"),
        ("model.rope_theta=0", "model.rope_theta=0: it must be a number > 0"),
        ("model.mlp_multiple_of=0", "model.mlp_multiple_of=0: it must be an integer >= 1"),
        ("model.norm_eps=-1", "model.norm_eps=-1: it must be a number > 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate_config(make_cfg([*base, override]))
    bogus = make_cfg([*base, "model.norm=bogus"])
    with pytest.raises(ConfigError, match="model.norm must be one of layernorm, rmsnorm, got 'bogus'"):
        build_network(OmegaConf.to_container(bogus.model), inputs, tuple(inputs))
