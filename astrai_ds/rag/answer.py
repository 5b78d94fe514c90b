"""Grounded answers: retrieved chunks and a conversation in one chat prompt that fits the context window.
The prompt format itself (`rag_messages`) lives with the chat template in `data.chat`, so that training data
(reading-comprehension conversations) and inference use the same one. `rag ask`, `rag eval` and the server's
RAG model all build their prompt with `grounded_chat`."""

from __future__ import annotations

from astrai_ds.data.chat import chunk_label, rag_messages  # noqa: F401  (the one grounded-prompt format)
from astrai_ds.errors import UserError

CLI_NAMES = {"question": "--question", "max_new_tokens": "--max-new-tokens"}


def grounded_chat(engine, messages: list[dict], chunks: list[dict], max_new_tokens: int,
                  names: dict[str, str] = CLI_NAMES) -> tuple[list[dict], list[dict]]:
    """(prompt messages, the chunks they hold) for a conversation whose last message is the user's question,
    answered from `chunks` (best-ranked first).

    The prompt is the grounding instructions followed by the conversation's own system messages (one system
    message), the earlier turns, and the question with its numbered chunks. It leaves `max_new_tokens` of the
    context for the answer: the lowest-ranked chunks are dropped first (down to the best one), then the oldest
    turns, then the best chunk. `names` names the question and the answer length in the error (CLI flags, or a
    request's fields)."""
    question = messages[-1]["content"]
    systems = [m["content"] for m in messages[:-1] if m["role"] == "system"]
    history = [m for m in messages[:-1] if m["role"] != "system"]
    room = engine.max_context - max_new_tokens

    def build(n: int, turns: list[dict]) -> list[dict]:
        grounded = rag_messages(question, chunks[:n])
        system = "\n\n".join([grounded[0]["content"], *systems])
        return [{"role": "system", "content": system}, *turns, *grounded[1:]]

    def tries():
        for n in range(len(chunks), 0, -1):  # fewer chunks, whole conversation
            yield n, history
        turns = history
        while turns:  # the best chunk, fewer turns (a kept history starts with a user's message)
            turns = turns[1:]
            while turns and turns[0]["role"] != "user":
                turns = turns[1:]
            yield min(len(chunks), 1), turns
        yield 0, []

    for n, turns in tries():
        prompt = build(n, turns)
        if len(engine.encode(prompt)) <= room:
            return prompt, chunks[:n]
    need = len(engine.encode(build(0, [])))
    context = engine.max_context
    if need < context:  # the question fits: the answer's length leaves it no room
        raise UserError(f"{names['max_new_tokens']} {max_new_tokens} leaves {max(room, 0)} of the model's "
                        f"{context}-token context for the prompt, and the question alone, with the instructions "
                        f"around it, is {need} tokens: lower {names['max_new_tokens']} to at most {context - need}")
    raise UserError(f"{names['question']} is too long: with the instructions around it, it is {need} tokens, and the "
                    f"model's context is {context} tokens; shorten it")


def fit_prompt(engine, question: str, chunks: list[dict], max_new_tokens: int) -> tuple[list[dict], list[dict]]:
    """`grounded_chat` of a single question: (messages, the chunks they hold)."""
    return grounded_chat(engine, [{"role": "user", "content": question}], chunks, max_new_tokens)
