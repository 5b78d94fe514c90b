"""The documents `rag index` reads: files and folders of .md, .markdown, .txt, and .jsonl records with a "text"
field, each with the hash of its text (what re-indexing and `rag eval` compare).

A file named twice (a folder and a file inside it, or two paths to one file) is read once, under the first name
it was given: its chunks would otherwise be indexed twice. A byte-order mark at the start of a file is not part
of its text (it would hide a first heading from the chunker).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from astrai_ds.errors import UserError

TEXT_SUFFIXES = {".md": True, ".markdown": True, ".txt": False}  # suffix -> Markdown?
BOM = "\ufeff"
MAX_LINKS = 40  # links followed when naming a loop (the kernel's own limit)


def content_hash(text: str) -> str:
    """sha256 of a document's text: the same text indexed from anywhere is the same document."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Document:
    source: str  # the file, or file:line for a .jsonl record
    text: str
    markdown: bool

    @property
    def sha256(self) -> str:
        return content_hash(self.text)


def read_documents(paths: list[str | Path]) -> tuple[list[Document], list[str]]:
    """The documents of files and folders (recursively: .md, .markdown, .txt, and .jsonl records with a "text"
    field), and the files skipped with the reason (binary, not UTF-8, unknown kind, empty, a link to nothing)."""
    files: dict[Path, Path] = {}  # resolved path -> the path as first given
    skipped = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file():
                    files.setdefault(f.resolve(), f)
                elif f.is_symlink() and not f.exists():
                    skipped.append(f"{f}: {_dead_link(f)}")
        elif p.is_file():
            files.setdefault(p.resolve(), p)
        elif p.is_symlink() or _loops(p):
            raise UserError(f"--docs {p}: {_dead_link(p)}; give the file or folder it should point to")
        else:
            raise UserError(f"--docs {p}: no such file or folder")
    docs = []
    for f in files.values():
        suffix = f.suffix.lower()
        if suffix not in TEXT_SUFFIXES and suffix != ".jsonl":
            skipped.append(f"{f}: not a .md, .markdown, .txt or .jsonl file")
            continue
        data = f.read_bytes()
        if b"\0" in data:
            skipped.append(f"{f}: binary (it holds NUL bytes)")
            continue
        try:
            text = data.decode("utf-8").removeprefix(BOM)
        except UnicodeDecodeError as e:
            skipped.append(f"{f}: not UTF-8 ({e.reason} at byte {e.start})")
            continue
        if suffix == ".jsonl":
            n = len(docs)
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    skipped.append(f"{f}:{lineno}: invalid JSON ({e.msg})")
                    continue
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    skipped.append(f"{f}:{lineno}: no 'text' string field")
                    continue
                if record["text"].strip():
                    docs.append(Document(f"{f}:{lineno}", record["text"], markdown=True))
            if len(docs) == n:
                skipped.append(f"{f}: no record with text")
        elif text.strip():
            docs.append(Document(str(f), text, TEXT_SUFFIXES[suffix]))
        else:
            skipped.append(f"{f}: empty")
    return docs, skipped


def _loops(p: Path) -> bool:
    try:
        os.stat(p)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _dead_link(p: Path) -> str:
    """Why the symbolic link `p` (or a link on the way to it) leads to no file: the loop it is part of, named link
    by link, or the missing path it points to."""
    chain, seen, here = [str(p)], {os.path.abspath(p)}, p
    for _ in range(MAX_LINKS):
        if not here.is_symlink():
            break
        target = os.readlink(here)
        chain.append(target)
        here = Path(os.path.abspath(here.parent / target))
        if str(here) in seen:
            return f"a loop of symbolic links ({' -> '.join(chain)})"
        seen.add(str(here))
    if _loops(p):
        return f"a loop of symbolic links on the way to it ({' -> '.join(chain)})"
    return f"a symbolic link to {chain[-1]}, which does not exist"
