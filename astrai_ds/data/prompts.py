"""Prompt records: questions with the answer a reward checks a generated response against (GRPO's data).

A prompt record is a JSON line with `messages` (chat messages ending with the user's question) or `prompt` (a
string, or such a list), and `answer` (any JSON value but null). Other fields pass through to the reward
functions: the built-in corpus's `grpo.jsonl` also holds `answers` ({"plain", "full"}), `full_forms`,
`preferred`, `task` and `lang`, as in `sft_eval.jsonl`.
"""

from __future__ import annotations

from pathlib import Path

from astrai_ds.data.chat import ChatError, check_messages
from astrai_ds.data.sources import iter_json_lines
from astrai_ds.errors import DataError

EXPECTED = ("GRPO expects on every line 'messages' (chat messages ending with the user's question) or 'prompt' (a "
            "string or such a list), and 'answer' (the value a reward checks), as in the grpo.jsonl that "
            "`astrai-ds corpus` writes")


def prompt_messages(record: dict) -> list[dict]:
    """The chat messages of a prompt record (or an eval record): `messages`, else `prompt`, a string of which
    becomes one user message. Not checked here: `read_prompt_records` checks them."""
    prompt = record.get("messages", record.get("prompt"))
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _check(record) -> None:
    """Raise ValueError saying which key of `record` is wrong and how."""
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object but {type(record).__name__}")
    key = "messages" if "messages" in record else "prompt" if "prompt" in record else None
    if key is None:
        raise ValueError("no 'messages' or 'prompt'")
    if record.get("answer") is None:
        messages = record[key]
        conversation = (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
                        and messages[-1].get("role") == "assistant")
        what = "'answer' is null" if "answer" in record else "no 'answer'"
        if conversation:  # e.g. sft.jsonl given for GRPO
            what += (": this looks like an SFT conversation (it ends with the assistant's reply), but GRPO generates "
                     "the reply itself and needs the 'answer' of every prompt to reward it")
        raise ValueError(what)
    if key == "prompt" and not isinstance(record["prompt"], (str, list)):
        raise ValueError(f"'prompt' is {type(record['prompt']).__name__}, not a string or a messages list")
    if record[key] in ([], ""):
        raise ValueError(f"'{key}' is empty")
    try:
        check_messages(prompt_messages(record), final="user")
    except ChatError as e:
        raise ValueError(f"'{key}': {e}") from None


def read_prompt_records(path: str | Path) -> list[dict]:
    """The records of a .jsonl prompt file, each checked (see the module's docstring) and returned as read; raises
    DataError in one line naming the file, the line, the key and what to do."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt data not found: {path} (the built-in prompts are grpo.jsonl, written by "
                        f"`astrai-ds corpus --out DIR`)")
    records = []
    try:
        for lineno, record in iter_json_lines(path):
            try:
                _check(record)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: {e}; {EXPECTED}") from None
            records.append(record)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); {EXPECTED}") from None
    if not records:
        raise DataError(f"{path}: no records (the file is empty or blank); {EXPECTED}")
    return records
