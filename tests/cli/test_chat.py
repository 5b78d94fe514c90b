"""`astrai-ds chat` in a pseudo-terminal: the answers stream back and equal the engine's greedy answers in-process
for the same messages (the history included), /system and /reset change the conversation, Ctrl-C stops an answer
and not the chat, a conversation longer than the context drops its oldest turns, /exit ends with 0."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import termios
import time

import pytest
import torch

from astrai_ds.inference.engine import LLMEngine
from astrai_ds.inference.sampling import SamplingParams
from astrai_ds.model.io import load_model_folder
from conftest import ROOT, VENV_BIN, env

CLI = str(VENV_BIN / "astrai-ds")
PROMPT = "you> "
EMPTY = "(an empty answer: this turn is left out of the conversation)\n"


@pytest.fixture(scope="module")
def engine(model_dir):
    model, tokenizer = load_model_folder(model_dir, dtype=torch.float32)
    return LLMEngine(model, tokenizer)


def _answer(engine, messages: list[dict]) -> str:
    """The engine's greedy answer (8 tokens at most) to a message list, in-process."""
    return engine.generate(messages, SamplingParams(max_new_tokens=8, temperature=0)).text


class Terminal:
    """`astrai-ds chat` on a pseudo-terminal it has as its controlling terminal, as in a shell (stdout and stderr
    both go to the terminal)."""

    def __init__(self, args: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes the chat, and never returns into pytest
            try:
                os.chdir(ROOT)
                os.execve(CLI, [CLI, "chat", *args], {**env(), "TERM": "dumb"})
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # rows, columns
        self.seen = ""

    def read_until(self, marker: str, timeout: float = 180) -> str:
        """What the terminal shows up to and including the next `marker` (newlines as "\\n")."""
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} within {timeout}s; the terminal shows:\n{self.seen}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                assert data, f"the chat ended before {marker!r}; the terminal shows:\n{self.seen}"
                self.seen += data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        shown, _, self.seen = self.seen.partition(marker)
        return shown + marker

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def turn(self, line: str) -> tuple[str, str]:
        """Send `line`, wait for the next prompt; what the chat printed before and after its "assistant> " label."""
        self.send(line)
        shown = self.read_until(PROMPT)
        assert "assistant> " in shown, shown
        before, _, after = shown.partition("assistant> ")
        return before, after.removesuffix(PROMPT)

    def command(self, line: str) -> str:
        self.send(line)
        return self.read_until(PROMPT)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.fd is not None:  # a failed test: end the chat rather than wait for it
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            os.close(self.fd)

    def exit_code(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                while select.select([self.fd], [], [], 0.1)[0] and os.read(self.fd, 4096):
                    pass  # drain, so the child never blocks on a full terminal
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                self.fd = None
                return os.waitstatus_to_exitcode(status)
        raise AssertionError("the chat did not exit")


def _args(model_dir, max_new_tokens: int) -> list[str]:
    return ["--model", str(model_dir), "--dtype", "fp32", "--temperature", "0", "--max-new-tokens", str(max_new_tokens)]


def _shown(text: str) -> str:
    """How the chat shows an answer: the text, a newline, and a notice when it is empty."""
    return text + "\n" + ("" if text.strip() else EMPTY)


def test_chat_answers_like_the_engine_with_its_history(model_dir, engine):
    with Terminal(_args(model_dir, 8)) as chat:
        chat.read_until(PROMPT)
        history = []
        for message in ("hello", "what is 1 + 1?"):
            messages = history + [{"role": "user", "content": message}]
            expected = _answer(engine, messages)
            assert chat.turn(message)[1] == _shown(expected)
            if expected.strip():
                history = messages + [{"role": "assistant", "content": expected}]

        system = {"role": "system", "content": "You answer in one word."}
        assert "system prompt set, conversation cleared" in chat.command("/system You answer in one word.")
        expected = _answer(engine, [system, {"role": "user", "content": "again"}])
        assert chat.turn("again")[1] == _shown(expected)
        assert "conversation cleared, the system prompt kept" in chat.command("/reset")
        assert chat.turn("again")[1] == _shown(expected)  # no history, and the system prompt still there
        assert "unknown command /nope" in chat.command("/nope")
        chat.send("/exit")
        assert chat.exit_code() == 0


def test_ctrl_c_stops_an_answer_not_the_chat(model_dir, engine):
    full = engine.generate([{"role": "user", "content": "hello"}], SamplingParams(max_new_tokens=100, temperature=0))
    assert full.completion_tokens > 50  # long enough to be stopped in the middle
    with Terminal(_args(model_dir, 100)) as chat:
        chat.read_until(PROMPT)
        chat.send("hello")
        chat.read_until("assistant> ")
        os.write(chat.fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT while the answer is generated
        shown = chat.read_until(PROMPT)
        assert shown.endswith("\n(stopped)\n" + PROMPT), shown
        partial = shown.removesuffix("\n(stopped)\n" + PROMPT).replace("^C", "")  # the terminal echoes ^C
        assert full.text.startswith(partial) and len(partial) < len(full.text)
        # the chat goes on, with the part of the answer that was shown in the conversation
        messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": partial},
                    {"role": "user", "content": "and then?"}] if partial.strip() else \
                   [{"role": "user", "content": "and then?"}]
        expected = engine.generate(messages, SamplingParams(max_new_tokens=100, temperature=0)).text
        assert chat.turn("and then?")[1] == _shown(expected)
        os.write(chat.fd, b"\x04")  # Ctrl-D at an empty prompt quits
        assert chat.exit_code() == 0


def _messages(turns: list[tuple[str, str]], message: str) -> list[dict]:
    return [{"role": role, "content": text} for turn in turns for role, text in zip(("user", "assistant"), turn)] \
        + [{"role": "user", "content": message}]


def test_a_conversation_longer_than_the_context_drops_its_oldest_turns(model_dir, engine):
    context = engine.max_context  # 128 tokens; a message below is about 55 with the template
    with Terminal(_args(model_dir, 8)) as chat:
        chat.read_until(PROMPT)
        turns, drops = [], 0
        for i in range(4):
            message = f"{i}: " + "The cat sat on the mat. " * 3
            message = message.strip()  # as the chat reads it
            dropped = 0  # the chat keeps the most recent turns that leave the answer its 8 tokens
            while len(engine.encode(_messages(turns[dropped:], message))) + 8 > context:
                dropped += 1
            turns = turns[dropped:]
            expected = _answer(engine, _messages(turns, message))
            before, shown = chat.turn(message)
            assert shown == _shown(expected), i
            notice = f"(the conversation outgrew the context ({context} tokens): dropped the oldest {dropped} turn"
            assert (notice in before) == (dropped > 0), (i, before)
            drops += dropped
            if expected.strip():
                turns.append((message, expected))
        assert drops > 0
        assert "does not fit the model's context (128 tokens) even alone" in chat.command("hello world " * 100)
        chat.send("/exit")
        assert chat.exit_code() == 0
