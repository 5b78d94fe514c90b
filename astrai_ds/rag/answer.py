"""Grounded answers: retrieved chunks in a chat prompt that fits the context window, lowest-ranked dropped first.
The prompt format itself (`rag_messages`) lives with the chat template in `data.chat`, so that training data
(reading-comprehension conversations) and inference use the same one."""

from __future__ import annotations

from astrai_ds.data.chat import chunk_label, rag_messages  # noqa: F401  (the one grounded-prompt format)
from astrai_ds.errors import UserError

def fit_prompt(engine, question: str, chunks: list[dict], max_new_tokens: int) -> tuple[list[dict], list[dict]]:
    """(messages, the chunks they hold): as many of the best-ranked chunks as leave `max_new_tokens` of the
    context for the answer, dropping the lowest-ranked first."""
    room = engine.max_context - max_new_tokens
    for n in range(len(chunks), -1, -1):
        messages = rag_messages(question, chunks[:n])
        if len(engine.encode(messages)) <= room:
            return messages, chunks[:n]
    need = len(engine.encode(rag_messages(question, [])))
    raise UserError(f"--question is too long: with the prompt around it, it is {need} tokens, and the model's "
                    f"context of {engine.max_context} tokens must also hold --max-new-tokens {max_new_tokens}; "
                    f"shorten the question or lower --max-new-tokens")
