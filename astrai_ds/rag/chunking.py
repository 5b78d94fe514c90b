"""Splitting documents into retrieval chunks: structure first, then (optionally) by meaning, never over a token limit.

1. Structure: a Markdown document is cut into sections at its headings (each chunk keeps its heading path),
   and a section into blocks: headings, paragraphs, list items, fenced code blocks, tables. Plain text has
   paragraphs only. A heading goes with the text under it: one with nothing under it before the next heading
   joins that section, and a heading's lines go into the chunk of the first text under it. Alone, a few title
   words would rank first for any question naming them, and hold no answer; only headings that leave no room
   for a character of text stay alone. A document's last headings, with nothing under them, join the section
   before them.
2. Sentences: a block longer than `max_tokens` is cut into sentences (English `.!?` before a space, Chinese
   `。！？；`, never inside quotes or inside a number such as 3.5); code is cut into lines, and a table between
   rows, every piece of it after the first under the table's header rows again, so that a row keeps the names
   of its columns (when the header rows take at most half the limit; longer ones are not repeated).
3. Tokens: a sentence (or a row) still longer than `max_tokens` is cut at token boundaries (never inside a
   character).
4. Semantic (optional): inside a section, sentence groups (each sentence with `window` neighbours on each side)
   are embedded, and the section breaks where the cosine distance between adjacent groups is above the
   `percentile` of that section's distances (as LlamaIndex's and LangChain's semantic splitters do).
5. Neighbouring pieces of one section are merged up to `target_tokens`.

Nothing is lost: every piece spans from its start to the next piece's start (whitespace included), so the
chunks of a document, in order, cover it exactly; a chunk's text is its span, after the table's header rows when
it starts inside a table. Every piece starts with a visible character (blocks start at a non-blank line,
sentences after the whitespace that ends the one before, and cuts go just before a visible character), so no
chunk is only whitespace.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from astrai_ds.errors import UserError

Span = tuple[int, int]
RULES = 2  # these rules' version, kept in an index: one chunked by earlier rules is chunked again, not reused

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^[ \t]{0,3}(```|~~~)")
_ITEM = re.compile(r"^[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+")
_TABLE_RULE = re.compile(r"^[ \t]*\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$")  # | --- | :-: |
_PIPE = re.compile(r"(?<!\\)\|")  # a cell border, not an escaped \|
_OPEN_QUOTES, _CLOSE_QUOTES = "“‘「『（(《", "”’」』）)》"
_ZH_ENDS, _EN_ENDS = "。！？；!?;", ".!?"


class ChunkError(UserError):
    """A document cannot be chunked as asked."""


@dataclass
class Chunk:
    source: str  # the document's name (a file, or file:line for a .jsonl record)
    text: str  # the document's text from start to end, after the table's header rows when it starts in a table
    start: int  # character offsets in the document's text
    end: int
    headings: tuple[str, ...] = ()  # the heading path, outermost first
    n_tokens: int = 0


@dataclass
class Section:
    headings: tuple[str, ...]
    blocks: list[tuple[Span, str]] = field(default_factory=list)  # ((start, end), kind: heading | text | code | table)


# ---------------------------------------------------------------- structure


def sections(text: str, markdown: bool) -> list[Section]:
    """The document's sections, whose blocks (heading lines, text, code, tables) tile the text from 0 to len(text)
    in order."""
    lines, pos = [], 0
    for line in text.splitlines(keepends=True):
        lines.append((pos, line))
        pos += len(line)
    out = [Section(())]
    stack: list[tuple[int, str]] = []  # (level, title)
    starts: list[tuple[int, str]] = []  # (line start, kind) of each block in the current section
    in_code, in_table, prev_blank = False, False, True

    def close(at: int) -> None:
        if starts and out[-1] is not None:
            for (s, kind), (e, _) in zip(starts, starts[1:] + [(at, "")]):
                out[-1].blocks.append(((s, e), kind))
        starts.clear()

    for i, (start, line) in enumerate(lines):
        body = line.rstrip("\r\n")
        if in_table:  # a table's rows run to a blank line, a heading, a fence or a list item
            if body.strip() and not (_HEADING.match(body) or _FENCE.match(body) or _ITEM.match(body)):
                continue
            in_table = False
        if markdown and _FENCE.match(body):
            if not in_code:
                starts.append((start, "code"))
            in_code, prev_blank = not in_code, False
            continue
        if in_code:
            continue
        heading = _HEADING.match(body) if markdown else None
        if heading:
            level = len(heading.group(1))
            stack = [(lv, t) for lv, t in stack if lv < level] + [(level, heading.group(2).strip())]
            if starts and all(kind == "heading" for _, kind in starts):  # nothing under the heading before
                out[-1].headings = tuple(t for _, t in stack)
            else:
                close(start)
                out.append(Section(tuple(t for _, t in stack)))
            starts.append((start, "heading"))
            prev_blank = True  # the next line starts a block of its own
            continue
        if not body.strip():
            prev_blank = True
            continue
        if markdown and i + 1 < len(lines) and _table_starts(body, lines[i + 1][1].rstrip("\r\n")):
            starts.append((start, "table"))
            in_table, prev_blank = True, False
            continue
        if prev_blank or (markdown and _ITEM.match(body)) or (starts and starts[-1][1] == "code"):
            starts.append((start, "text"))
        prev_blank = False
    close(len(text))
    sections_ = [s for s in out if s.blocks]
    if not sections_:
        return [Section((), [((0, len(text)), "text")])] if text else []
    if len(sections_) > 1 and all(kind == "heading" for _, kind in sections_[-1].blocks):
        sections_[-2].blocks += sections_.pop().blocks  # the document's last headings, with nothing under them
    # Leading text before the first block (blank lines) belongs to the first block.
    (s0, e0), kind = sections_[0].blocks[0]
    sections_[0].blocks[0] = ((0, e0), kind)
    return sections_


def _table_starts(header: str, rule: str) -> bool:
    """Whether a line and the line after it start a table (GitHub Flavored Markdown): a row of cells between
    pipes over a delimiter row (| --- | :-: |) of as many cells."""
    return bool(_PIPE.search(header) and "|" in rule and _TABLE_RULE.match(rule)) and _cells(header) == _cells(rule)


def _cells(row: str) -> int:
    row = row.strip().removeprefix("|")
    if row.endswith("|") and not row.endswith("\\|"):
        row = row[:-1]
    return len(_PIPE.split(row))


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


class _Cutter:
    """Cuts one document's spans to token limits. A piece that starts inside a table's body is read, counted and
    stored after the table's header rows (the header and delimiter rows; repeated for the tables whose header rows
    take at most half of `max_tokens`)."""

    def __init__(self, text: str, source: str, tokenizer, sections_: list[Section], max_tokens: int):
        self.text, self.source, self.tokenizer = text, source, tokenizer
        self.body_of: dict[int, int] = {}  # a table block's start -> its body's start (after the delimiter row)
        self.tables: list[tuple[int, int, int]] = []  # (header start, body start, end) where the header repeats
        for section in sections_:
            for (s, e), kind in section.blocks:
                if kind != "table":
                    continue
                first_visible = e - len(text[s:e].lstrip())  # (a document's first block starts at blank lines)
                header = max(s, text.rfind("\n", s, first_visible) + 1)
                body = text.find("\n", text.find("\n", header, e) + 1, e) + 1
                if header < body < e:
                    self.body_of[s] = body
                    if self._tokens(text[header:body]) <= max_tokens // 2:
                        self.tables.append((header, body, e))
        self._bodies = [body for _, body, _ in self.tables]

    def _tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def prefix(self, at: int) -> str:
        """The header rows of the table whose body `at` is in, else ""."""
        i = bisect.bisect_right(self._bodies, at) - 1
        if i >= 0 and at < self.tables[i][2]:
            return self.text[self.tables[i][0]:self.tables[i][1]]
        return ""

    def piece(self, span: Span) -> str:
        """A piece's text: its span, after the table's header rows when it starts in a table's body."""
        return self.prefix(span[0]) + self.text[span[0]:span[1]]

    def count(self, span: Span) -> int:
        return self._tokens(self.piece(span))

    def fit(self, span: Span, kind: str, max_tokens: int) -> list[Span]:
        """Spans of at most max_tokens tokens covering `span`: the block itself, else its sentences (code: its
        lines; a table: its rows, the first with the header rows), else token cuts."""
        if self.count(span) <= max_tokens:
            return [span]
        body = self.body_of.get(span[0], span[1]) if kind == "table" else span[1]
        if body < span[1] and self.prefix(body):  # rows are counted under the header rows, which the first
            limit = max_tokens  # row takes along itself (with the blank lines before a document's first table)
            while True:
                rows = self.fit((body, span[1]), "code", limit)
                over = self.count((span[0], rows[0][1])) - max_tokens
                if over <= 0:
                    return [(span[0], rows[0][1]), *rows[1:]]
                limit -= over
        if body < span[1]:  # header rows too long to repeat: they stay together, as the rows do
            parts = [(span[0], body), *_lines(self.text, (body, span[1]))]
        else:
            parts = _lines(self.text, span) if kind in ("code", "table") else sentences(self.text, span)
        out = []
        for part in parts:
            out += [part] if self.count(part) <= max_tokens else self._token_cut(part, max_tokens)
        return out

    def _token_cut(self, span: Span, max_tokens: int, keep: int = 0) -> list[Span]:
        """Cut `span` into pieces of at most max_tokens tokens. A cut goes just before a visible character and
        after at least one (so no piece is only whitespace), and after `keep`; never inside a character."""
        text, count = self.text, self.count
        pieces, start, end = [], span[0], span[1]
        while count((start, end)) > max_tokens:
            lo, hi = start, end - 1  # the longest prefix within the limit, by bisection over characters
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if count((start, mid)) <= max_tokens:
                    lo = mid
                else:
                    hi = mid - 1
            first_visible = start + len(text[start:end]) - len(text[start:end].lstrip())
            floor = max(first_visible, keep)
            cut = lo
            while cut > floor and text[cut].isspace():
                cut -= 1
            # Prefer a word boundary (after whitespace) in the piece's second half: English words stay whole.
            word = cut
            while word > max(floor, start + (lo - start) // 2) and not text[word - 1].isspace():
                word -= 1
            if word > max(floor, start + (lo - start) // 2):
                cut = word
            if cut <= floor:  # no cut fits: the text up to the second visible character is over the limit
                rest = text[first_visible + 1:end]
                bad = (start, first_visible + 1 + len(rest) - len(rest.lstrip()))
                under = " under the table's header rows" if self.prefix(start) else ""
                raise ChunkError(f"{self.source}: the text {text[bad[0]:bad[1]]!r} at offset {start} is "
                                 f"{count(bad)} tokens{under} (a character and the whitespace around it are never "
                                 f"cut apart), more than max_tokens {max_tokens}; use a larger max_tokens")
            pieces.append((start, cut))
            start = cut
        pieces.append((start, end))
        return pieces

    def merge(self, spans: list[Span], target: int, fixed_breaks: set[int] = frozenset()) -> list[Span]:
        """Merge neighbouring spans while the merged piece stays within `target` tokens; never across a start in
        `fixed_breaks`."""
        out: list[Span] = []
        for s, e in spans:
            if out and s not in fixed_breaks and self.count((out[-1][0], e)) <= target:
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
        return out

    def glue(self, units: list[tuple[Span, str]], max_tokens: int) -> list[tuple[Span, str]]:
        """A section's fitted spans (with their block's kind), its leading heading lines joined to the first piece
        of text under them (all of them, else the innermost ones that fit)."""
        heads = next((i for i, (_, kind) in enumerate(units) if kind != "heading"), len(units))
        if heads == len(units):
            return units  # headings alone: nothing to join them to
        for i in range(heads):
            joined = self._join((units[i][0][0], units[heads - 1][0][1]), units[heads], max_tokens)
            if joined:
                return units[:i] + joined + units[heads + 1:]
        return units

    def _join(self, head: Span, unit: tuple[Span, str], max_tokens: int) -> list[tuple[Span, str]] | None:
        """`unit` cut again so that the heading lines `head` right before it fit with its first piece within
        max_tokens; None when they leave no room for a character of it."""
        span, kind = unit
        budget = max_tokens - self.count(head)
        while budget >= 1:
            try:
                parts = self.fit(span, kind, budget)
            except ChunkError:
                break
            joined = (head[0], parts[0][1])
            over = self.count(joined) - max_tokens
            if over <= 0:
                return [(joined, kind)] + [(p, kind) for p in parts[1:]]
            budget -= over  # token counts do not simply add up: try again with less room
        try:  # too little room for a character counted alone: cut the headings and the text after them together
            return [(p, kind) for p in self._token_cut((head[0], span[1]), max_tokens, keep=span[0])]
        except ChunkError:
            return None


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
    sections_ = sections(text, markdown)
    cutter = _Cutter(text, source, tokenizer, sections_, params.max_tokens)
    pieces = []
    for section in sections_:
        blocks = section.blocks
        if params.semantic:
            blocks = [(part, kind) for span, kind in blocks
                      for part in ([span] if kind in ("code", "table") else sentences(text, span))]
        units = cutter.glue([(part, kind) for span, kind in blocks
                             for part in cutter.fit(span, kind, params.max_tokens)], params.max_tokens)
        spans = [span for span, _ in units]
        breaks: set[int] = set()
        if params.semantic:  # (never before a heading: a document's last headings stay with the text before them)
            w = params.window
            groups = [text[spans[max(i - w, 0)][0]:spans[min(i + w, len(spans) - 1)][1]] for i in range(len(spans))]
            breaks = {spans[i + 1][0] for i in semantic_breaks(groups, embed, params.percentile)
                      if units[i + 1][1] != "heading"}
        pieces += [Chunk(source, cutter.piece(span), *span, section.headings, cutter.count(span))
                   for span in cutter.merge(spans, params.target_tokens, breaks)]
    return pieces
