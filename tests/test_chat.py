"""lmlab-chat: a conversation with a language model through stdin, the reply streamed as it is sampled.

A small character model learns two exchanges (``hi`` -> ``hello there``, ``bye`` -> ``see you``); driven
through stdin it answers each message, ``/reset`` forgets the history and ``/exit`` quits; with all of stdin
as one message it answers once (for scripts). The history is cut to the context, oldest exchange first, and a
reply stops where the model would begin the next user turn."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from conftest import QUIET, Command, compose_cfg, script
from lmlab.chat import Conversation, _safe_length
from lmlab.errors import ConfigError
from lmlab.run.checkpoint import load_language_model
from lmlab.train import train

# one worker runs this module's tests, which share its trained fixtures
pytestmark = pytest.mark.xdist_group("chat")

EXCHANGES = {"hi": "hello there", "bye": "see you"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A character GPT trained on the two exchanges in the chat template, until it answers them."""
    root = tmp_path_factory.mktemp("chat")
    text = root / "dialogues.txt"
    turns = [f"User: {message}\nAssistant: {answer}\n" for message, answer in EXCHANGES.items()]
    text.write_text("".join(turns * 400), encoding="utf-8")
    overrides = [
        "data=text_files",
        f"data.source.train_files={text}",
        "data.source.val_fraction=0.05",
        "data.source.test_fraction=0.0",
        "test=false",
        "tokenizer=char",
        "data.block_size=64",
        "data.batch_size=16",
        "model.n_layer=2",
        "model.n_embd=64",
        "trainer.max_steps=250",
        "trainer.val_check_interval=250",
        "trainer.limit_val_batches=2",
        "optimizer.lr=3e-3",
        "callbacks.samples=null",
        *QUIET,
    ]
    train(compose_cfg(root, overrides, run_dir=root / "run"))
    return root / "run" / "checkpoints" / "last.ckpt"


def test_a_scripted_conversation_answers_each_message_and_resets(checkpoint: Path, tmp_path: Path) -> None:
    stdin = tmp_path / "conversation.txt"
    stdin.write_text("hi\nbye\n/reset\nhi\n/exit\nbye\n")
    args = [script("lmlab-chat"), f"ckpt_path={checkpoint}", "interactive=true", "temperature=0"]
    done = Command(["bash", "-c", " ".join(args) + f" < {stdin}"], tmp_path, "chat").wait()
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["hello there", "see you", "(history cleared)", "hello there"], done.stdout


def test_all_of_stdin_is_one_message_for_scripts(checkpoint: Path, tmp_path: Path) -> None:
    done = Command(
        ["bash", "-c", f"echo bye | {script('lmlab-chat')} ckpt_path={checkpoint} temperature=0"], tmp_path, "one"
    ).wait()
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "see you\n"
    empty = Command(["bash", "-c", f"{script('lmlab-chat')} ckpt_path={checkpoint} < /dev/null"], tmp_path, "no")
    empty.wait()
    assert empty.returncode == 1 and "error: stdin: stdin has no text." in empty.stderr


class Chunks(io.StringIO):
    """Records each write, to see the reply arrive piece by piece."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []

    def write(self, text: str) -> int:
        self.chunks.append(text)
        return super().write(text)


def _conversation(checkpoint: Path, max_new_tokens: int = 20) -> Conversation:
    model, _ = load_language_model(checkpoint)
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "top_k": None, "top_p": None, "seed": None}
    return Conversation(model, "User: ", "Assistant: ", **sampling)


def test_the_reply_streams_and_stops_before_the_next_user_turn(checkpoint: Path) -> None:
    conversation = _conversation(checkpoint, max_new_tokens=40)  # room to run on into the next turn
    out = Chunks()
    assert conversation.reply("hi", out) == "hello there"
    assert out.getvalue() == "hello there\n"
    assert len([c for c in out.chunks if c.strip()]) > 3, "written as it is sampled, not at the end"
    assert conversation.turns == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]


def test_the_history_keeps_the_latest_exchanges_that_fit_the_context(checkpoint: Path) -> None:
    conversation = _conversation(checkpoint, max_new_tokens=20)
    for message in ("hi", "bye", "hi", "bye"):
        conversation.reply(message, io.StringIO())
    ids = conversation.prompt_ids("hi")
    assert len(ids) + 20 <= 64 and conversation.dropped > 0
    text = conversation.tokenizer.decode(ids)
    assert text.startswith("User: ") and text.endswith("User: hi\nAssistant:"), "whole turns, the oldest left out"
    long = conversation.prompt_ids("hi " * 40)
    assert len(long) == 64 - 20 and conversation.tokenizer.decode(long).endswith("hi \nAssistant:")


def test_what_may_begin_the_stop_marker_is_held_back() -> None:
    assert _safe_length("hello\nUs", "\nUser:") == len("hello")
    assert _safe_length("hello", "\nUser:") == len("hello")
    assert _safe_length("caf\ufffd", "\nUser:") == len("caf"), "a character whose bytes have not all come"


TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _pretrained_with_template(folder: Path) -> Path:
    """A BPE tokenizer saved as a pretrained one, with a chat template in its ``tokenizer_config.json``."""
    from lmlab.tokenizers import train_bpe

    folder.mkdir()
    train_bpe(["User: hi there\nAssistant: hello\n" * 50], vocab_size=300).backend.save(str(folder / "tokenizer.json"))
    config = {"chat_template": [{"name": "default", "template": TEMPLATE}, {"name": "tool_use", "template": "x"}]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_pretrained_tokenizers_chat_template_is_kept_and_used(tmp_path: Path) -> None:
    from lmlab.inference.language_model import LanguageModel
    from lmlab.models.gpt import GPT
    from lmlab.tokenizers import load_pretrained, tokenizer_from_state

    folder = _pretrained_with_template(tmp_path / "tok")
    tokenizer = load_pretrained(name_or_path=str(folder), eos_token="<|endoftext|>")
    assert tokenizer.chat_template == TEMPLATE, "the default of the named templates"
    again = tokenizer_from_state(tokenizer.state())
    assert again.chat_template == TEMPLATE, "kept in the checkpoint's tokenizer state"
    (folder / "tokenizer_config.json").unlink()
    plain = load_pretrained(name_or_path=str(folder), eos_token="<|endoftext|>")
    assert plain.chat_template is None and plain.fingerprint() == tokenizer.fingerprint(), "ids unchanged"

    model = LanguageModel(GPT(tokenizer.vocab_size, 64, n_layer=1, n_head=2, n_embd=16), tokenizer)
    sampling = {"max_new_tokens": 8, "temperature": 0.0, "top_k": None, "top_p": None, "seed": None}
    templated = Conversation(model, "User: ", "Assistant: ", "auto", **dict(sampling))
    turns = [{"role": r, "content": c} for r, c in (("user", "hi"), ("assistant", "hello"), ("user", "bye"))]
    expected = "<|user|>hi<|endoftext|>\n<|assistant|>hello<|endoftext|>\n<|user|>bye<|endoftext|>\n<|assistant|>"
    assert templated.format.render(turns) == expected
    assert templated.format.reply_end() == "<|endoftext|>", "what the template writes after a reply"
    forced = Conversation(model, "User: ", "Assistant: ", "plain", **dict(sampling))
    assert forced.format.render(turns) == "User: hi\nAssistant: hello\nUser: bye\nAssistant:"
    with pytest.raises(ConfigError, match="template='jinja': pick one of auto, plain"):
        Conversation(model, "User: ", "Assistant: ", "jinja", **dict(sampling))


def test_export_hands_the_chat_template_to_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from lmlab.export import write_tokenizer
    from lmlab.tokenizers import load_pretrained

    tokenizer = load_pretrained(
        name_or_path=str(_pretrained_with_template(tmp_path / "tok")), eos_token="<|endoftext|>"
    )
    (tmp_path / "hf").mkdir()
    write_tokenizer(tokenizer, tmp_path / "hf", 64)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": "hi"}]
    rendered = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>hi<|endoftext|>\n<|assistant|>"


def test_a_checkpoint_of_another_task_is_refused(tmp_path: Path) -> None:
    classifier = Path(__file__).parent / "fixtures" / "checkpoints" / "cls_bigru.ckpt"
    done = Command(["bash", "-c", f"echo hi | {script('lmlab-chat')} ckpt_path={classifier}"], tmp_path, "cls").wait()
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "is not a language model checkpoint; lmlab-chat needs one." in done.stderr
