"""Hostile or broken inputs from a stranger reach the user as one clear line, never a traceback, and never run:
chat templates (in lmlab-chat, instruction tuning and lmlab-export) and pickled weights in a pretrained folder.

Honest templates (a ChatML one, and a Qwen-style one with a system prompt, tools and tool calls) render as
Jinja's own sandbox renders them, far within the limits, over a long conversation."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import CHAT_TEMPLATE, QUIET, Command, compose_cfg, script, toy_chat_lm_folder, write_exchanges
from lmlab.data.chat_format import ChatFormat, RenderLimits, render_template
from lmlab.errors import ChatTemplateError, ConfigError, UnsafeCheckpointError

EOS = "<|endoftext|>"
#: the steps of Qwen2.5's template: a system prompt (or the default one), tools, tool calls and tool responses
QWEN_STYLE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first)
        or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' ~ tool_call.name ~ '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

#: what the sandbox refuses while rendering: a change to a list (no dunder name, so it compiles)
REFUSED_AT_RENDER = "{% for m in messages %}{{ messages.append(m) }}{% endfor %}"
#: what reaches for Python internals: refused before it renders
ESCAPE = "{{ cycler.__init__.__globals__.os.system('touch pwned') }}"
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
#: the steps run out first, or (on a slow machine, or steps slow to take, such as macro calls) the seconds
STEPS_OR_TIME = r"template_limits\.max_(steps=1000000|seconds=1\.0)[ :]"


def _long_conversation() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """400 turns of 500 characters with a system prompt, a tool call and its response; and 20 tools."""
    text = ("lorem ipsum dolor sit amet " * 20)[:500]
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."}]
    messages += [{"role": ("user", "assistant")[i % 2], "content": f"{i} {text}"} for i in range(400)]
    call = {"function": {"name": "lookup", "arguments": {"query": "weather"}}}
    messages += [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
        {"role": "user", "content": "thanks"},
    ]
    schema = {"type": "object", "properties": {"query": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": f"tool{i}", "parameters": schema}} for i in range(20)]
    return messages, tools


#: a template that leaves tool turns out with transformers' loop controls
SKIPS_TOOLS = "{% for m in messages %}{% if m.role == 'tool' %}{% continue %}{% endif %}{{ m.content }}\n{% endfor %}"


@pytest.mark.parametrize(
    ("template", "reply_end"),
    [(CHAT_TEMPLATE, EOS), (QWEN_STYLE, "<|im_end|>"), (SKIPS_TOOLS, None)],
    ids=["chatml", "qwen_style", "continue"],
)
def test_honest_templates_render_as_jinja_does_far_within_the_limits(template: str, reply_end: str | None) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    jinja = jinja.from_string(template)
    messages, tools = _long_conversation()
    # a tenth of the default steps, a fifth of the characters besides the messages' own (the markup of 400 turns)
    tight = RenderLimits(max_seconds=0.5, max_steps=100_000, max_chars=20_000)
    for variables in ({}, {"tools": tools}):
        for reply_follows in (True, False):
            expected = jinja.render(messages=messages, add_generation_prompt=reply_follows, eos_token=EOS, **variables)
            got = render_template(
                template, "x", tight, messages, add_generation_prompt=reply_follows, eos_token=EOS, **variables
            )
            assert got == expected
    chat = ChatFormat(template=template, eos_token=EOS)
    assert chat.exchange("hi", "hello")[1].startswith("hello")
    assert chat.reply_end() == reply_end


@pytest.mark.parametrize(
    ("template", "stopped_by"),
    [
        (NESTED_LOOPS, STEPS_OR_TIME),
        # cubic in the message's length, without a call or lookup inside the loops
        (
            "{% set c = messages[0].content %}{% for a in c %}{% for b in c %}{% for d in c %}{% endfor %}{% endfor %}"
            "{% endfor %}",
            STEPS_OR_TIME,
        ),
        ("{% for i in range(100000) %}{{ range(100000)|sum }}{% endfor %}", STEPS_OR_TIME),
        (
            "{% macro f(n) %}{% if n %}{{ f(n - 1) ~ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
            STEPS_OR_TIME,
        ),
        ("{% for i in range(100000) %}{{ 'all work and no play ' * 5 }}{% endfor %}", r"template_limits\.max_chars="),
        ("{{ 'x' * 10**10 }}", r"template_limits\.max_chars=100000 "),
        ("{{ 'x'|center(10**10) }}", r"template_limits\.max_chars="),
        ("{{ '%*d' % (10**10, 1) }}", r"template_limits\.max_chars="),
        ("{{ (['x' * 90000] * 90000)|join }}", r"template_limits\.max_chars="),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            r"template_limits\.max_chars=",
        ),
    ],
    ids=[
        "nested_range",
        "nested_content",
        "range_sum",
        "macro_tree",
        "output",
        "times",
        "center",
        "format",
        "join",
        "doubling",
    ],
)
def test_a_template_that_loops_or_grows_without_end_is_stopped_within_a_second(template: str, stopped_by: str) -> None:
    chat = ChatFormat(template=template, origin="The chat template of tokenizer 'stranger/model'")
    started = time.monotonic()
    with pytest.raises(ChatTemplateError) as refused:
        chat.render([{"role": "user", "content": "tell me a story " * 20}])
    took = time.monotonic() - started
    message = str(refused.value)
    assert took < 2.0, f"stopped only after {took:.1f}s"
    assert message.startswith("The chat template of tokenizer 'stranger/model' was stopped at ")
    assert re.search(stopped_by, message) and "it is unsafe" in message and "template=plain" in message
    assert "\n" not in message


def test_what_the_sandbox_refuses_or_cannot_compile_is_named_unsafe_or_broken() -> None:
    origin = "The chat template of tokenizer 'stranger/model'"
    cases = {
        ESCAPE: "names the Python internal '__globals__', which only a way out of Jinja's sandbox needs: it is unsafe",
        REFUSED_AT_RENDER: "does what Jinja's sandbox refuses (access to attribute 'append' of 'list' object is unsafe",
        "{% for m in messages %}{{ m.content }": "does not compile (line 1: unexpected '}'): it is broken",
        "{{ message.content }}": "fails while rendering a conversation (UndefinedError: 'message' is undefined)",
        "{% for m in messages %}{{ m.content / 2 }}{% endfor %}": "fails while rendering a conversation (TypeError",
    }
    for template, problem in cases.items():
        with pytest.raises(ChatTemplateError) as refused:
            ChatFormat(template=template, origin=origin).render([{"role": "user", "content": "hi"}])
        assert str(refused.value).startswith(f"{origin} {problem}"), str(refused.value)
    # a template's own refusal of a conversation is the template working: it stays a ConfigError of its own
    refusing = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(ConfigError, match="refuses the conversation: Conversation roles must alternate") as refused:
        ChatFormat(template=refusing).render([{"role": "user", "content": "hi"}])
    assert not isinstance(refused.value, ChatTemplateError)
    ChatFormat(template=refusing).check()


def test_render_limits_are_checked_where_the_config_sets_them() -> None:
    assert RenderLimits.of(None, "template_limits") == RenderLimits()
    assert RenderLimits.of({"max_steps": 10}, "data.template_limits").max_steps == 10
    with pytest.raises(ConfigError, match=r"Invalid value template_limits.max_seconds=0: it must be a number > 0"):
        RenderLimits.of({"max_seconds": 0}, "template_limits")
    with pytest.raises(ConfigError, match=r"data.template_limits: unknown setting\(s\) max_time; the settings are"):
        RenderLimits.of({"max_time": 1}, "data.template_limits")


# -- end to end: lmlab-chat, lmlab-export, lmlab-train --------------------------------------------------------


def _checkpoint_with_chat_template(path: Path, template: str) -> Path:
    """An untrained one-layer GPT checkpoint whose pretrained tokenizer (the toy chat model's) brings ``template``,
    as a run on a stranger's tokenizer folder saves it."""
    from lmlab.tasks.lm import LanguageModelingTask
    from lmlab.tokenizers import load_pretrained

    tokenizer = load_pretrained(name_or_path=str(toy_chat_lm_folder()), eos_token=EOS)
    tokenizer.chat_template = template
    info = {"vocab_size": tokenizer.vocab_size, "block_size": 32, "tokenizer_fingerprint": tokenizer.fingerprint()}
    model = {"_target_": "lmlab.models.GPT", "n_layer": 1, "n_head": 2, "n_embd": 16}
    task = LanguageModelingTask(model=model, data_info=info, tokenizer_state=tokenizer.state())
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def test_lmlab_chat_refuses_a_template_the_sandbox_refuses_in_one_line(tmp_path: Path) -> None:
    refused = _checkpoint_with_chat_template(tmp_path / "refused.ckpt", REFUSED_AT_RENDER)
    chat = f"echo hi | {script('lmlab-chat')} ckpt_path={refused} max_new_tokens=2"
    done = Command(["bash", "-c", chat], tmp_path, "chat").wait()
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 1 and "Traceback" not in done.stderr and done.stdout == "", done.stderr[-3000:]
    tokenizer = f"The chat template of tokenizer '{toy_chat_lm_folder()}'"
    assert errors == [
        f"error: {tokenizer} does what Jinja's sandbox refuses (access to attribute 'append' of 'list' object is "
        "unsafe): it is unsafe. Use the plain template (data.template=plain; for lmlab-chat, template=plain) or "
        "another tokenizer."
    ], done.stderr[-3000:]


def test_lmlab_export_copies_no_hostile_template_and_writes_nothing(tmp_path: Path) -> None:
    from lmlab.export import export

    tokenizer = f"The chat template of tokenizer '{toy_chat_lm_folder()}'"
    problems = {ESCAPE: "names the Python internal '__globals__'", NESTED_LOOPS: "was stopped at template_limits.max_"}
    for i, (template, problem) in enumerate(problems.items()):
        checkpoint = _checkpoint_with_chat_template(tmp_path / f"{i}.ckpt", template)
        cfg = compose_cfg(tmp_path, [f"ckpt_path={checkpoint}", f"out={tmp_path / 'hf_model'}"], "export")
        with pytest.raises(ChatTemplateError) as refused:
            export(cfg)
        message = str(refused.value)
        assert message.startswith(f"{tokenizer} {problem}"), message
        assert "it is unsafe. lmlab-export hands no such template on, so it wrote nothing" in message
        left = [p.name for p in tmp_path.iterdir() if "hf_model" in p.name]
        assert not left, f"no exported folder, nothing half-written beside it: {left}"


def test_instruction_tuning_on_a_tokenizer_with_a_hostile_template_stops_before_training(tmp_path: Path) -> None:
    from lmlab.train import train

    folder = tmp_path / "stranger"
    shutil.copytree(toy_chat_lm_folder(), folder)
    (folder / "chat_template.jinja").write_text(NESTED_LOOPS)
    overrides = [
        "data=instructions",
        f"data.source.train_files={write_exchanges(tmp_path / 'pairs.jsonl', 10)}",
        "data.block_size=32",
        "model=hf_causal_lm",
        f"model.name_or_path={folder}",
        "tokenizer=pretrained",
        f"tokenizer.name_or_path={folder}",
        f"tokenizer.eos_token='{EOS}'",
        "data.template_limits.max_seconds=0.2",
        *QUIET,
    ]
    started = time.monotonic()
    with pytest.raises(ChatTemplateError, match=rf"^The chat template of tokenizer '{folder}' was stopped at data\."):
        train(compose_cfg(tmp_path, overrides, run_dir=tmp_path / "run"))
    assert time.monotonic() - started < 60
    assert not list(tmp_path.glob("run/checkpoints/*.ckpt"))


# -- pickled weights in a pretrained folder --------------------------------------------------------------------


class MakesMarker:
    """Unpickling this creates the marker folder: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (str(self.marker),)


def test_pickled_weights_in_a_pretrained_folder_are_refused_naming_the_file(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from conftest import save_tiny_causal_lm
    from lmlab.models.hf_causal_lm import PretrainedCausalLM
    from lmlab.run.runtime import user_errors

    folder = save_tiny_causal_lm(tmp_path / "stranger", "gpt2", vocab_size=64, eos_id=0)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({**weights, "payload": MakesMarker(marker)}, folder / "pytorch_model.bin")

    with pytest.raises(UnsafeCheckpointError) as refused:
        PretrainedCausalLM(64, 16, str(folder))
    message = str(refused.value)
    assert message.startswith(f"Refusing to load '{folder / 'pytorch_model.bin'}': its weights are pickled")
    assert f"transformers.AutoModelForCausalLM.from_pretrained('{folder}').save_pretrained(" in message
    assert "\n" not in message and "weights_only" not in message
    assert not marker.exists(), "the pickle's code ran"
    with pytest.raises(SystemExit, match="1"):
        with user_errors():
            PretrainedCausalLM(64, 16, str(folder))

    # pickled weights without code are refused the same way: lmlab reads no pickle from a stranger
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="its weights are pickled"):
        PretrainedCausalLM(64, 16, str(folder))
