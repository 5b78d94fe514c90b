"""Chat records (SFT conversations, DPO pairs): reading, checking and rendering with the ChatML template.

A conversation renders as one string, shown here broken after each "\\n" (a newline character):

    <bos><|im_start|>system\\n{content}<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n

and its loss mask is 1 exactly on the content tokens of every assistant turn and on that turn's
<|im_end|> (the model must learn to stop), 0 on everything else: system and user turns, the
`<|im_start|>assistant\\n` header and the "\\n" after <|im_end|>.

The header `role\\n` and the content are encoded separately, so the boundary between them is always a
token boundary: the mask is exact, and the generation prompt (`add_generation_prompt`) is a prefix of the
tokens the model was trained on. Content is encoded with allow_special=False: a message that contains the
text "<|im_end|>" cannot end its turn.

A bad record raises `ChatError`, whose `reason` (a key of `SKIP_REASONS`) is what `prepare` counts.
"""

from __future__ import annotations

import functools
import unicodedata
from pathlib import Path

from astrai_ds.data.chat_template import assistant_spans, render_template, token_mask
from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.errors import UserError

ROLES = ("system", "user", "assistant")

# Why a chat record was skipped, as counted in a prepare summary and the shard index.
SKIP_REASONS = {
    "invalid_json": "the line is not valid JSON",
    "invalid_utf8": "the line is not valid UTF-8",
    "missing_fields": "the record lacks a field or a field has the wrong type (SFT: 'messages', or 'prompt' and "
                      "'response'; DPO: 'prompt' or 'messages', with 'chosen' and 'rejected')",
    "unknown_role": f"a message's role is not one of {', '.join(ROLES)}",
    "empty_content": "a message's content is empty or only whitespace",
    "no_assistant_turn": "the conversation has no assistant turn",
    "last_not_assistant": "the conversation does not end with an assistant turn",
    "last_not_user": "the DPO prompt does not end with a user turn",
    "empty_response": "the chosen or the rejected response is empty",
    "identical_pair": "the chosen and the rejected responses are the same",
    "too_long": "too long for seq_len (SFT: the prompt leaves no assistant token inside seq_len; DPO: the prompt "
                "and the longer response do not fit in seq_len)",
}


class ChatError(ValueError):
    """A chat record that cannot be trained on; `reason` is a key of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(detail)
        self.reason = reason


# ---------------------------------------------------------------- checking


def _content(value, where: str) -> str:
    if not isinstance(value, str):
        raise ChatError("missing_fields", f"{where} is not a string")
    if not value.strip():
        raise ChatError("empty_content", f"{where} is empty")
    return unicodedata.normalize("NFC", value)  # the same form as pretraining text (sources.iter_texts)


def check_messages(messages, final: str | None = "assistant") -> list[dict]:
    """Validated copy of a messages list as [{"role", "content"}] with NFC-normalized content.

    final: the role the last message must have ("assistant" for training conversations, "user" for a DPO
    or generation prompt), or None for no rule. Raises ChatError."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("missing_fields", "'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatError("missing_fields", f"message {i} is not an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ChatError("unknown_role", f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": _content(m["content"], f"message {i} ({m['role']}) content")})
    if final == "assistant":
        if not any(m["role"] == "assistant" for m in out):
            raise ChatError("no_assistant_turn", "the conversation has no assistant turn: nothing to train on")
        if out[-1]["role"] != "assistant":
            raise ChatError("last_not_assistant", f"the last message has role {out[-1]['role']!r}, not 'assistant'")
    elif final == "user" and out[-1]["role"] != "user":
        raise ChatError("last_not_user", f"the prompt's last message has role {out[-1]['role']!r}, not 'user'")
    return out


def _prompt(record: dict) -> list[dict]:
    """The prompt of a prompt/response record as messages: a string (with an optional 'system' string) or a
    messages list."""
    prompt = record["prompt"]
    if isinstance(prompt, list):
        return list(prompt)
    if not isinstance(prompt, str):
        raise ChatError("missing_fields", "'prompt' must be a string or a messages list")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ChatError("missing_fields", "'system' must be a string")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def normalize_record(record) -> list[dict]:
    """The checked messages of one SFT record: {"messages": [...]} or {"prompt", "response"} (prompt a string,
    optionally with "system", or a messages list). The conversation must end with an assistant turn."""
    if not isinstance(record, dict):
        raise ChatError("missing_fields", "the record is not a JSON object")
    if "chosen" in record or "rejected" in record:
        raise ChatError("missing_fields", "the record is a DPO pair ('chosen'/'rejected'): prepare it with --stage dpo")
    if "messages" in record:
        return check_messages(record["messages"])
    if "prompt" in record and "response" in record:
        return check_messages(_prompt(record) + [{"role": "assistant", "content": record["response"]}])
    raise ChatError("missing_fields", "the record has neither 'messages' nor 'prompt' and 'response'")


def normalize_pair(record) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen, rejected) of one DPO record: "prompt" (a string, optionally with "system", or a
    messages list) or "messages" (the prompt as a list), plus "chosen" and "rejected" strings. The prompt must
    end with a user turn; the responses must be non-empty and differ."""
    if not isinstance(record, dict):
        raise ChatError("missing_fields", "the record is not a JSON object")
    if "chosen" not in record and "rejected" not in record and ("response" in record or "messages" in record):
        raise ChatError("missing_fields", "the record has no 'chosen'/'rejected' responses: it looks like SFT "
                                          "data, which is prepared with --stage sft")
    if "prompt" in record:
        prompt = _prompt(record)
    elif "messages" in record:
        prompt = record["messages"]
    else:
        raise ChatError("missing_fields", "the record has neither 'prompt' nor 'messages'")
    responses = []
    for key in ("chosen", "rejected"):
        value = record.get(key)
        if not isinstance(value, str):
            raise ChatError("missing_fields", f"'{key}' is missing or not a string")
        if not value.strip():
            raise ChatError("empty_response", f"'{key}' is empty")
        responses.append(unicodedata.normalize("NFC", value))
    prompt = check_messages(prompt, final="user")
    chosen, rejected = responses
    if chosen.strip() == rejected.strip():
        raise ChatError("identical_pair", "'chosen' and 'rejected' are the same text: the pair prefers nothing")
    return prompt, chosen, rejected


# ---------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=64)
def _fixed(tok: Tokenizer, text: str) -> tuple[int, ...]:
    # The template's constant pieces ("user\n", "\n"), encoded once per tokenizer.
    return tuple(tok.encode(text))


def _template_of(tokenizer: Tokenizer) -> str | None:
    """The pretrained model's own chat template (None: ours, ChatML as below); a UserError where it has none."""
    if tokenizer.native:
        return None
    if tokenizer.chat_template is None:
        raise UserError(f"tokenizer {tokenizer.path} has no chat template (no chat_template in its "
                        f"tokenizer_config.json, no chat_template.jinja beside it): it cannot render a chat; give "
                        f"plain-text prompts, or use the model's instruction-tuned variant")
    return tokenizer.chat_template


def _render_template(tokenizer: Tokenizer, source: str, messages: list[dict], add_generation_prompt: bool,
                     only_last: bool = False, cut: bool = False) -> tuple[list[int], list[int]]:
    """(ids, mask) of a pretrained model's own template rendered as transformers renders it, encoded once (special
    tokens' text as their ids); mask 1 on the assistant turns (see data/chat_template.py). cut: end the text at
    the last assistant turn's end."""
    special = tokenizer.special_tokens
    text, spans = assistant_spans(source, messages, special, only_last=only_last)
    if add_generation_prompt:
        prompt = render_template(source, messages, True, special)
        if not prompt.startswith(text):
            spans = []  # the generation prompt is rendered apart from the turns: nothing of it is trained on
        text = prompt
    if cut and spans:
        text = text[:spans[-1][1]]
    ids, offsets = tokenizer.encode_with_offsets(text)
    return ids, token_mask(offsets, spans)


def render_chat(tokenizer: Tokenizer, messages: list[dict],
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, mask) of `messages` in ChatML, starting with <bos>; mask is 1 on assistant content and its
    <|im_end|>. add_generation_prompt appends `<|im_start|>assistant\\n` for the model to continue. A pretrained
    model's tokenizer renders its own chat template instead (`_render_template`).

    The messages are not checked here (see check_messages)."""
    source = _template_of(tokenizer)
    if source is not None:
        return _render_template(tokenizer, source, messages, add_generation_prompt)
    tok = tokenizer
    ids, mask = [tok.bos_id], [0]
    newline = _fixed(tok, "\n")
    for m in messages:
        header = (tok.im_start_id,) + _fixed(tok, m["role"] + "\n")
        content = tok.encode(m["content"])
        trained = 1 if m["role"] == "assistant" else 0
        ids += header
        ids += content
        ids.append(tok.im_end_id)
        ids += newline
        mask += [0] * len(header) + [trained] * (len(content) + 1) + [0] * len(newline)
    if add_generation_prompt:
        header = (tok.im_start_id,) + _fixed(tok, "assistant\n")
        ids += header
        mask += [0] * len(header)
    return ids, mask


def render_response(tokenizer: Tokenizer, prompt: list[dict], response: str) -> tuple[list[int], list[int]]:
    """(ids, mask) of a prompt with the generation header, then `response` and <|im_end|>: the tokens of the
    same conversation rendered by render_chat, without the final "\\n". mask is 1 on the response and its
    <|im_end|> only: assistant turns inside the prompt are context, not the response being judged."""
    source = _template_of(tokenizer)
    if source is not None:
        return _render_template(tokenizer, source, prompt + [{"role": "assistant", "content": response}], False,
                                only_last=True, cut=True)
    ids, _ = render_chat(tokenizer, prompt, add_generation_prompt=True)
    response_ids = tokenizer.encode(response) + [tokenizer.im_end_id]
    return ids + response_ids, [0] * len(ids) + [1] * len(response_ids)


# ---------------------------------------------------------------- grounded (retrieval-augmented) prompts

RAG_SYSTEM = "Answer from the context. 根据资料回答。"


def chunk_label(chunk: dict, with_source: bool = False) -> str:
    """What a retrieved chunk is: its heading path ("Title > Section"), or its file's name when it has no heading.
    with_source: the source in full first, then the heading path (for listing sources to a person)."""
    path = " > ".join(chunk.get("headings") or [])
    if with_source:
        return f"{chunk['source']}" + (f" > {path}" if path else "")
    return path or Path(chunk["source"]).name


def rag_messages(question: str, chunks: list[dict]) -> list[dict]:
    """The chat of a grounded question: a short system message, then the numbered chunks ({"source", "headings",
    "text"}), each under its label, and the question in one user message; without chunks, the question alone (a
    closed-book question). `rag ask`, `rag eval`, the server's RAG model and the corpus's reading-comprehension
    conversations all use this one format."""
    context = "\n\n".join(f"[{i}] {chunk_label(c)}\n{c['text'].strip()}" for i, c in enumerate(chunks, 1))
    user = f"Context:\n{context}\n\nQuestion: {question}" if chunks else f"Question: {question}"
    return [{"role": "system", "content": RAG_SYSTEM}, {"role": "user", "content": user}]
