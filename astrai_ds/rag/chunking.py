"""Splitting documents into retrieval chunks: structure first, then (optionally) by meaning, never over a token limit.

1. Structure: a Markdown document is cut into sections at its headings (each chunk keeps its heading path),
   and a section into blocks: paragraphs, list items, fenced code blocks. Plain text has paragraphs only.
2. Sentences: a block longer than `max_tokens` is cut into sentences (English `.!?` before a space, Chinese
   `。！？；`, never inside quotes or inside a number such as 3.5); code is cut into lines.
3. Tokens: a sentence still longer than `max_tokens` is cut at token boundaries (never inside a character).
4. Semantic (optional): inside a section, sentence groups (each sentence with `window` neighbours on each side)
   are embedded, and the section breaks where the cosine distance between adjacent groups is above the
   `percentile` of that section's distances (as LlamaIndex's and LangChain's semantic splitters do).
5. Neighbouring pieces of one section are merged up to `target_tokens`.

Nothing is lost: every piece spans from its start to the next piece's start (whitespace included), so the
chunks of a document, in order, cover it exactly. Every piece starts with a visible character (blocks start at
a non-blank line, sentences after the whitespace that ends the one before, and cuts go just before a visible
character), so no chunk is only whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from astrai_ds.errors import UserError

Span = tuple[int, int]

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^[ \t]{0,3}(```|~~~)")
_ITEM = re.compile(r"^[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+")
_OPEN_QUOTES, _CLOSE_QUOTES = "“‘「『（(《", "”’」』）)》"
_ZH_ENDS, _EN_ENDS = "。！？；!?;", ".!?"


class ChunkError(UserError):
    """A document cannot be chunked as asked."""


@dataclass
class Chunk:
    source: str  # the document's name (a file, or file:line for a .jsonl record)
    text: str
    start: int  # character offsets in the document's text
    end: int
    headings: tuple[str, ...] = ()  # the heading path, outermost first
    n_tokens: int = 0


@dataclass
class Section:
    headings: tuple[str, ...]
    blocks: list[tuple[Span, str]] = field(default_factory=list)  # ((start, end), kind: text | code)


# ---------------------------------------------------------------- structure


def sections(text: str, markdown: bool) -> list[Section]:
    """The document's sections, whose blocks tile the text from 0 to len(text) in order."""
    lines, pos = [], 0
    for line in text.splitlines(keepends=True):
        lines.append((pos, line))
        pos += len(line)
    out = [Section(())]
    stack: list[tuple[int, str]] = []  # (level, title)
    starts: list[tuple[int, str]] = []  # (line start, kind) of each block in the current section
    in_code, prev_blank = False, True

    def close(at: int) -> None:
        if starts and out[-1] is not None:
            for (s, kind), (e, _) in zip(starts, starts[1:] + [(at, "")]):
                out[-1].blocks.append(((s, e), kind))
        starts.clear()

    for start, line in lines:
        body = line.rstrip("\r\n")
        if markdown and _FENCE.match(body):
            if not in_code:
                starts.append((start, "code"))
            in_code, prev_blank = not in_code, False
            continue
        if in_code:
            continue
        heading = _HEADING.match(body) if markdown else None
        if heading:
            close(start)
            level = len(heading.group(1))
            stack = [(lv, t) for lv, t in stack if lv < level] + [(level, heading.group(2).strip())]
            out.append(Section(tuple(t for _, t in stack)))
            starts.append((start, "text"))
            prev_blank = True  # the heading line is a block of its own's start; the next line starts a new one
            continue
        if not body.strip():
            prev_blank = True
            continue
        if prev_blank or (markdown and _ITEM.match(body)) or (starts and starts[-1][1] == "code"):
            starts.append((start, "text"))
        prev_blank = False
    close(len(text))
    sections_ = [s for s in out if s.blocks]
    if not sections_:
        return [Section((), [((0, len(text)), "text")])] if text else []
    # Leading text before the first block (blank lines) belongs to the first block.
    (s0, e0), kind = sections_[0].blocks[0]
    sections_[0].blocks[0] = ((0, e0), kind)
    return sections_


def sentences(text: str, span: Span) -> list[Span]:
    """Sentence spans tiling `span`: cut after a sentence end (and the closing quotes right after it), never
    inside quotes; an English end must be followed by whitespace, so 3.5 or e.g.x stay whole."""
    start, end = span
    cuts, depth, ascii_open, i = [], 0, False, start
    while i < end:
        c = text[i]
        if c in _OPEN_QUOTES:
            depth += 1
        elif c in _CLOSE_QUOTES:
            depth = max(depth - 1, 0)
        elif c == '"':
            ascii_open = not ascii_open
        elif depth == 0 and not ascii_open and (c in _ZH_ENDS or c in _EN_ENDS):
            j = i + 1
            while j < end and text[j] in _EN_ENDS + _ZH_ENDS:  # "?!" or "……"
                j += 1
            while j < end and text[j] in _CLOSE_QUOTES + "\"'":
                j += 1
            if c in _ZH_ENDS or j >= end or text[j].isspace():
                while j < end and text[j].isspace():
                    j += 1
                if j < end:
                    cuts.append(j)
                i = j
                continue
        i += 1
    bounds = [start, *cuts, end]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _lines(text: str, span: Span) -> list[Span]:
    """Line spans tiling `span`; a blank line stays with the line before it."""
    start, end = span
    cuts = [start + m.end() for m in re.finditer(r"\n(?=[^\n]*\S)", text[start:end]) if start + m.end() < end]
    bounds = [start, *cuts, end]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


# ---------------------------------------------------------------- token limits


class _Counter:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> int:
        return len(self.tokenizer.encode(text))


def _token_cut(text: str, span: Span, max_tokens: int, count: _Counter, source: str) -> list[Span]:
    """Cut `span` into pieces of at most max_tokens tokens. A cut goes just before a visible character and
    after at least one (so no piece is only whitespace), never inside a character."""
    pieces, start, end = [], span[0], span[1]
    while count(text[start:end]) > max_tokens:
        lo, hi = start, end - 1  # the longest prefix within the limit, by bisection over characters
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(text[start:mid]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        first_visible = start + len(text[start:end]) - len(text[start:end].lstrip())
        cut = lo
        while cut > first_visible and text[cut].isspace():
            cut -= 1
        # Prefer a word boundary (after whitespace) in the piece's second half: English words stay whole.
        word = cut
        while word > max(first_visible, start + (lo - start) // 2) and not text[word - 1].isspace():
            word -= 1
        if word > max(first_visible, start + (lo - start) // 2):
            cut = word
        if cut <= first_visible:  # no cut fits: the text up to the second visible character is over the limit
            rest = text[first_visible + 1:end]
            bad = text[start:first_visible + 1 + len(rest) - len(rest.lstrip())]
            raise ChunkError(f"{source}: the text {bad!r} at offset {start} is {count(bad)} tokens (a character and "
                             f"the whitespace around it are never cut apart), more than max_tokens {max_tokens}; "
                             f"use a larger max_tokens")
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def _fit(text: str, span: Span, kind: str, max_tokens: int, count: _Counter, source: str) -> list[Span]:
    """Spans of at most max_tokens tokens covering `span`: the block itself, else its sentences (code: its
    lines), else token cuts."""
    if count(text[span[0]:span[1]]) <= max_tokens:
        return [span]
    out = []
    for part in (_lines(text, span) if kind == "code" else sentences(text, span)):
        out += [part] if count(text[part[0]:part[1]]) <= max_tokens else _token_cut(text, part, max_tokens, count,
                                                                                    source)
    return out


def _merge(text: str, spans: list[Span], target: int, count: _Counter, fixed_breaks: set[int] = frozenset()
           ) -> list[Span]:
    """Merge neighbouring spans while the merged text stays within `target` tokens; never across a start in
    `fixed_breaks`."""
    out: list[Span] = []
    for s, e in spans:
        if out and s not in fixed_breaks and count(text[out[-1][0]:e]) <= target:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


# ---------------------------------------------------------------- semantic


def semantic_breaks(groups: list[str], embed: Callable[[list[str]], np.ndarray], percentile: float) -> list[int]:
    """Indices i where a break goes between sentence i and i + 1: the cosine distance of their groups'
    embeddings is above the `percentile` of all adjacent distances."""
    if len(groups) < 3:
        return []
    vectors = np.asarray(embed(groups), dtype=np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    distances = 1.0 - np.sum(vectors[:-1] * vectors[1:], axis=1)
    threshold = np.percentile(distances, percentile)
    return [i for i, d in enumerate(distances) if d > threshold]


# ---------------------------------------------------------------- the whole document


@dataclass
class ChunkParams:
    max_tokens: int = 256  # no chunk is longer (tokens of the model's tokenizer)
    target_tokens: int | None = None  # merge neighbouring pieces up to this (default: max_tokens)
    semantic: bool = False
    window: int = 1  # semantic: neighbours on each side in a sentence group
    percentile: float = 90.0  # semantic: break above this percentile of a section's distances

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ChunkError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        self.target_tokens = self.target_tokens or self.max_tokens
        if not 1 <= self.target_tokens <= self.max_tokens:
            raise ChunkError(f"target_tokens must be in [1, max_tokens={self.max_tokens}], got {self.target_tokens}")
        if not 0 < self.percentile < 100:
            raise ChunkError(f"percentile must be in (0, 100), got {self.percentile}")
        if self.window < 0:
            raise ChunkError(f"window must be >= 0, got {self.window}")


def chunk_document(text: str, source: str, tokenizer, params: ChunkParams, markdown: bool = True,
                   embed: Callable[[list[str]], np.ndarray] | None = None) -> list[Chunk]:
    """The chunks of one document, in order, covering `text` exactly. `embed` (texts -> vectors) is needed when
    params.semantic."""
    if params.semantic and embed is None:
        raise ValueError("semantic chunking needs an embed function")
    count = _Counter(tokenizer)
    pieces = []
    for section in sections(text, markdown):
        spans: list[Span] = []
        for span, kind in section.blocks:
            spans += _fit(text, span, kind, params.max_tokens, count, source)
        breaks: set[int] = set()
        if params.semantic:
            units = [p for (span, kind) in section.blocks
                     for p in ([span] if kind == "code" else sentences(text, span))]
            units = [u for part in units for u in _fit(text, part, "text", params.max_tokens, count, source)]
            w = params.window
            groups = [text[units[max(i - w, 0)][0]:units[min(i + w, len(units) - 1)][1]] for i in range(len(units))]
            breaks = {units[i + 1][0] for i in semantic_breaks(groups, embed, params.percentile)}
            spans = units
        pieces += [Chunk(source, text[s:e], s, e, section.headings, count(text[s:e]))
                   for s, e in _merge(text, spans, params.target_tokens, count, breaks)]
    return pieces
