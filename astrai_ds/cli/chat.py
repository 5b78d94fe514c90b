"""Chat with a model folder in the terminal. Each answer streams as it is generated, and the conversation so far
is the prompt of every turn (the engine's prefix cache serves the earlier turns without computing them again).
When the conversation no longer fits the model's context, the oldest turns are dropped, as stderr says.

Type a message and Enter. Commands: /reset clears the conversation (the system prompt stays); /system TEXT sets
the system prompt and clears the conversation (/system alone removes it); /exit or Ctrl-D quits. Ctrl-C stops
the answer being generated, not the chat. Sampling by default (temperature 0.7, top-p 0.9); --temperature 0 is
greedy."""

from __future__ import annotations

import sys

from astrai_ds.cli.model_commands import (StopOnCtrlC, add_compile_argument, add_model_arguments,
                                          add_sampling_arguments, check_chat, check_sampling, load_engine,
                                          sampling_defaults, stream_to, user_prompt)
from astrai_ds.errors import UserError

NAME = "chat"
HELP = "chat with a model folder in the terminal"

CHAT_COMMANDS = "/reset, /system TEXT, /exit (or Ctrl-D); Ctrl-C stops an answer"


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="the system prompt to start with")
    add_compile_argument(p)
    add_sampling_arguments(p)


class Conversation:
    """The system prompt and the (user, assistant) turns so far."""

    def __init__(self, system: str | None):
        self.system, self.turns = system, []

    def messages(self, user: str, first_turn: int = 0) -> list[dict]:
        """The prompt for `user`'s message: the system prompt, the turns from `first_turn` on, then `user`."""
        history = [{"role": role, "content": text} for turn in self.turns[first_turn:]
                   for role, text in zip(("user", "assistant"), turn)]
        return user_prompt(user, self.system)[:-1] + history + [{"role": "user", "content": user}]

    def fit(self, engine, user: str, room: int) -> tuple[list[dict] | None, int]:
        """(the prompt for `user`, turns dropped): the most recent turns that leave `room` tokens for the answer
        in the context. (None, 0) when the system prompt and `user` alone fill the context."""
        for first in range(len(self.turns) + 1):
            messages = self.messages(user, first)
            tokens = len(engine.encode(messages))
            if tokens + room <= engine.max_context:
                break
        if tokens >= engine.max_context:
            return None, 0
        del self.turns[:first]  # dropped for good: the next turns build on what the model saw
        return messages, first


def _notice(text: str) -> None:
    print(f"({text})", file=sys.stderr, flush=True)


def _command(line: str, conversation: Conversation) -> bool:
    """Run a /command; False for /exit."""
    command, _, rest = line.partition(" ")
    if command in ("/exit", "/quit"):
        return False
    if command == "/reset":
        conversation.turns.clear()
        _notice("conversation cleared" + (", the system prompt kept" if conversation.system else ""))
    elif command == "/system":
        conversation.system = rest.strip() or None
        conversation.turns.clear()
        _notice("system prompt set, conversation cleared" if conversation.system else
                "system prompt removed, conversation cleared")
    else:
        _notice(f"unknown command {command}; the commands: {CHAT_COMMANDS}")
    return True


def _turn(engine, conversation: Conversation, line: str, params, room: int, stop: StopOnCtrlC) -> None:
    """Answer `line`, streaming, and add the turn to the conversation."""
    messages, dropped = conversation.fit(engine, line, room)
    if messages is None:
        _notice(f"this message does not fit the model's context ({engine.max_context} tokens) even alone: "
                f"shorten it" + (" or the system prompt" if conversation.system else ""))
        return
    if dropped:
        _notice(f"the conversation outgrew the context ({engine.max_context} tokens): dropped the oldest "
                f"{dropped} turn{'s' if dropped > 1 else ''}")
    sys.stdout.write("assistant> ")
    sys.stdout.flush()
    try:
        result = stream_to(sys.stdout, engine, messages, params, stop)
    except UserError as e:  # a request the engine refuses ends the turn, not the chat
        print(flush=True)
        _notice(f"error: {e}")
        return
    print(flush=True)
    if stop.stopped:
        _notice("stopped")
    if result["text"].strip():  # a stopped answer stays as far as it was shown
        conversation.turns.append((line, result["text"]))
    else:
        _notice("an empty answer: this turn is left out of the conversation")


def run(args) -> int:
    params = check_sampling({**sampling_defaults(args), "seed": None})  # --seed seeds the engine: see load_engine
    if args.system is not None:
        check_chat(user_prompt("?", args.system), "--system")
    engine = load_engine(args)
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    conversation = Conversation(args.system or None)
    # Room for the answer when old turns must go: the whole answer, unless that is most of the context.
    room = min(params.max_new_tokens, engine.max_context // 2)
    stop = StopOnCtrlC()
    _notice(f"chat with {args.model}: {CHAT_COMMANDS}")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:  # Ctrl-D
            print()
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            print()
            continue
        if not line:
            continue
        if line.startswith("/"):
            if not _command(line, conversation):
                return 0
            continue
        with stop:  # from here Ctrl-C stops this turn's answer, between two steps of the engine
            _turn(engine, conversation, line, params, room, stop)
