"""Grounded answers: retrieved chunks in a chat prompt that fits the context window, lowest-ranked dropped first."""

from __future__ import annotations

from astrai_ds.errors import UserError

SYSTEM = "Answer the question from the context. 根据资料回答问题。"


def chunk_label(chunk: dict) -> str:
    """Where a chunk comes from: its source and heading path."""
    path = " › ".join(chunk.get("headings") or [])
    return f"{chunk['source']}" + (f" › {path}" if path else "")


def rag_messages(question: str, chunks: list[dict]) -> list[dict]:
    """The chat of a grounded question: a system message, then the numbered chunks and the question."""
    context = "\n\n".join(f"[{i}] {chunk_label(c)}\n{c['text'].strip()}" for i, c in enumerate(chunks, 1))
    user = f"Context:\n{context}\n\nQuestion: {question}" if chunks else f"Question: {question}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


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
