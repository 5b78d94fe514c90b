"""A pretrained model's own chat template (Jinja, from its tokenizer_config.json or chat_template.jinja), rendered as
`transformers` renders it, and the SFT loss mask of that rendering.

The template is untrusted code from a model folder: it runs in Jinja's immutable sandbox, with what transformers
gives it (`messages`, `add_generation_prompt`, the special tokens, `raise_exception`, `strftime_now`, a `tojson`
that keeps non-ASCII text, loop controls) and nothing else. `{% generation %}...{% endgeneration %}` blocks, which
some templates put around what the assistant says, are honoured.

The mask: 1 on the tokens of every assistant turn as the template renders it, up to and including its
end-of-turn token, 0 elsewhere (the template's headers, system and user turns, a default system message the
template adds, whitespace after the end-of-turn token). A template that marks generation blocks gives the mask
from them; otherwise each assistant turn is found as what the template adds to the conversation before it
rendered with `add_generation_prompt`. Like `transformers`' assistant mask, a token counts when any of its
characters lies in an assistant span.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

from astrai_ds.errors import UserError

# Markers around a generation block while it renders (Unicode noncharacters: never in real text)
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"


class ChatTemplateError(UserError):
    """The template failed (its own raise_exception included), or it cannot give a loss mask."""


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller) -> str:
            return _OPEN + caller() + _CLOSE

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


def render_template(source: str, messages: list[dict], add_generation_prompt: bool, special: dict[str, str | None],
                    marks: bool = False) -> str:
    """The template's text for `messages`. `special`: bos_token, eos_token, pad_token, unk_token as the folder names
    them. With `marks`, generation blocks stay wrapped in the private markers (see `spans`)."""
    import jinja2

    try:
        text = _compile(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                       tools=None, documents=None, **special)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from None
    return text if marks else text.replace(_OPEN, "").replace(_CLOSE, "")


def _marked_spans(text: str) -> tuple[str, list[tuple[int, int]]]:
    """(text without markers, [(start, end)] of each generation block in it)."""
    out, spans, start = [], [], None
    for ch in text:
        if ch == _OPEN:
            start = len(out)
        elif ch == _CLOSE and start is not None:
            spans.append((start, len(out)))
            start = None
        else:
            out.append(ch)
    return "".join(out), spans


def assistant_spans(source: str, messages: list[dict], special: dict, only_last: bool = False
                    ) -> tuple[str, list[tuple[int, int]]]:
    """(the rendering of `messages`, the character spans of its assistant turns): from the template's generation
    blocks where it has them, else by rendering the conversation up to each assistant turn."""
    for m in messages:
        if _OPEN in m["content"] or _CLOSE in m["content"]:
            raise ChatTemplateError("a message contains the Unicode noncharacter U+FDD0 or U+FDD1")
    marked = render_template(source, messages, False, special, marks=True)
    text, spans = _marked_spans(marked)
    if spans:
        return text, spans[-1:] if only_last else spans
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or (only_last and i != len(messages) - 1):
            continue
        before = render_template(source, messages[:i], True, special)
        upto = render_template(source, messages[:i + 1], False, special)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ChatTemplateError(
                f"the chat template renders the turns before assistant message {i} differently once it follows "
                f"(it rewrites earlier turns), so its assistant tokens cannot be told apart; mark them with "
                f"{{% generation %}} ... {{% endgeneration %}} in the template")
        turn = upto[len(before):]
        spans.append((len(before), len(before) + len(turn.rstrip())))
    return text, spans


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token (by its character offsets) that overlaps an assistant span, else 0."""
    mask = []
    for start, end in offsets:
        hit = any(start < s_end and end > s_start for s_start, s_end in spans) if end > start else any(
            s_start <= start < s_end for s_start, s_end in spans)
        mask.append(int(hit))
    return mask
