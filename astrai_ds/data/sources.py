"""Raw text sources: `.txt` files (one document per line) and `.jsonl` files (one JSON object per line,
the document in its `text` field), read lazily line by line and NFC-normalized; and the JSON records of
chat `.jsonl` files (`iter_records`), which the chat module checks and normalizes; `iter_json_lines` reads a
`.jsonl` file that must be whole (evaluation sets), stopping at the first line that is not JSON. `check_out_dir` checks the
output folder of a data command before any work starts.

The tokenizer has no normalizer (so that decode(encode(x)) == x for any string); text is NFC-normalized
here instead, once, before both tokenizer training and encoding, so the two always see the same form.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterator

from astrai_ds.errors import DataError

EXTENSIONS = (".txt", ".jsonl")

# Why a record was skipped, as counted in a prepare summary and the shard index.
SKIP_REASONS = {
    "invalid_json": "the line is not valid JSON",
    "missing_text": "the JSON object has no string field 'text'",
    "empty_text": "the text is empty or only whitespace",
    "invalid_utf8": "the line is not valid UTF-8",
}


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value, path: str = "") -> str | None:
    """The path (`messages.0.content`) of the first string in `value` (JSON: dicts, lists, strings) that holds a
    lone UTF-16 surrogate (JSON's "\\ud800"), which no tokenizer can encode; None when there is none."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def expand_inputs(inputs: list) -> list[Path]:
    """Input files in the given order; a folder stands for its `.txt` and `.jsonl` files (recursively, sorted).

    Raises DataError for a missing path, an unknown extension or a folder without text files, before any
    work starts."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in EXTENSIONS)
            if not found:
                raise DataError(f"input folder {path} holds no .txt or .jsonl files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in EXTENSIONS:
                raise DataError(
                    f"input {path}: unknown file extension {path.suffix!r}; use .txt (one document per line) "
                    f"or .jsonl (one JSON object per line with a 'text' field)"
                )
            files.append(path)
        else:
            raise DataError(f"input file not found: {path}")
    if not files:
        raise DataError("no input files given; pass one or more .txt or .jsonl files")
    return files


def check_out_dir(out_dir, what: str) -> Path:
    """`out_dir` as a Path, once it is known that it can be a folder: it is one, or it is missing and no path
    above it is a file. Raises DataError naming the file in the way; `what` says what goes in the folder."""
    out = Path(out_dir)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DataError(f"cannot write {what} to {out}: {blocking} is a file, not a folder; give --out a folder "
                        f"(a missing one is created), or move the file away")
    return out


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    # Binary mode: text mode would also split on '\r', '\x1c', '\u2028' and friends inside a document.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark
            if raw.endswith(b"\n"):
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            yield lineno, raw


def _parse(raw: bytes, jsonl: bool) -> tuple[str | None, str | None]:
    """(text, None) for a good record, (None, reason) for a bad one; a blank line gives (None, None)."""
    if not raw.strip():
        return None, None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    if jsonl:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return None, "invalid_json"
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            return None, "missing_text"
    else:
        text = line
    if not text.strip():
        return None, "empty_text"
    return unicodedata.normalize("NFC", text), None


def iter_texts(path: Path, skipped: Counter | None = None, examples: dict | None = None) -> Iterator[str]:
    """The NFC-normalized documents of one file, lazily; blank lines are passed over.

    A bad record is counted in `skipped[reason]` (its "file:line" kept in `examples[reason]`, a few per
    reason). When `skipped` is None, a damaged record raises DataError naming the file and line, and an
    empty text is passed over like a blank line."""
    path = Path(path)
    if path.suffix not in EXTENSIONS:
        raise DataError(f"input {path}: unknown file extension {path.suffix!r}; use .txt or .jsonl")
    jsonl = path.suffix == ".jsonl"
    for lineno, raw in _lines(path):
        text, reason = _parse(raw, jsonl)
        if text is not None:
            yield text
        elif reason is not None:
            if skipped is None:
                if reason == "empty_text":
                    continue
                raise DataError(f"{path}, line {lineno}: {SKIP_REASONS[reason]}; fix or remove that line")
            count_skip(skipped, examples, reason, f"{path}:{lineno}")


def count_skip(skipped: Counter, examples: dict | None, reason: str, where: str) -> None:
    """Count a skipped record under `reason`, keeping the first few places ("file:line ...") as examples."""
    skipped[reason] += 1
    if examples is not None and len(examples.setdefault(reason, [])) < 5:
        examples[reason].append(where)


def iter_records(path: Path, skipped: Counter, examples: dict | None = None) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON value) of every non-blank line of a `.jsonl` file, lazily. A line that is not
    UTF-8 or not JSON is counted in `skipped[reason]` (its "file:line" in `examples[reason]`, a few per
    reason); what the value holds is the caller's to check."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise DataError(f"input {path}: chat data must be .jsonl (one JSON object per line), not {path.suffix!r}")
    for lineno, raw in _lines(path):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            count_skip(skipped, examples, "invalid_utf8", f"{path}:{lineno}")
            continue
        except json.JSONDecodeError:
            count_skip(skipped, examples, "invalid_json", f"{path}:{lineno}")
            continue
        yield lineno, value


def iter_json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON value) of every non-blank line of a file that must be valid throughout: the first
    line that is not JSON is a DataError naming the file and the line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
