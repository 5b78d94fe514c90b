"""The README and docs/*.md link to each other, to files of the project and to headings: every relative link must
lead somewhere. A link is `[text](target)` or `![alt](target)` outside code; its target is a path relative to the
page (a file or a folder of the repository), `#anchor` on the page itself, or both. An anchor is a heading's
GitHub slug: the heading's text lower-cased, without punctuation, spaces made hyphens, `-1`, `-2` ... added to
repeats.

No torch here: `python tests/test_docs.py` runs the check alone and lists every broken link.
"""

from __future__ import annotations

import re
import sys
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto: ...


def prose_lines(text: str):
    """(line number, line) for every line outside fenced code blocks."""
    fenced = None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if fenced is None:
                fenced = m.group(1)
            elif m.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (code spans' content, links' text), lower-cased, with
    everything but letters, digits, `_`, `-` and spaces removed, and each space made a hyphen."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"[*~]", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(page.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def links(page: Path):
    """(line number, target) of every link outside code on `page`."""
    for n, line in prose_lines(page.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub("", line)
        for m in LINK.finditer(line):
            yield n, m.group(1)


def broken_links(page: Path) -> list[str]:
    """One message per link of `page` whose file or heading does not exist."""
    problems = []
    for n, target in links(page):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{n}: ({target})"
        if not dest.exists():
            problems.append(f"{where} {path} does not exist")
        elif ROOT not in dest.parents and dest != ROOT:
            problems.append(f"{where} leads out of the repository")
        elif anchor:
            if dest.is_dir() or dest.suffix.lower() not in (".md", ".markdown"):
                problems.append(f"{where} #{anchor}: anchors are checked on Markdown pages only")
            elif unquote(anchor).lower() not in anchors(dest):
                problems.append(f"{where} {dest.relative_to(ROOT)} has no heading #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    assert not broken_links(page), "\n".join(broken_links(page))


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / unquote(t.partition("#")[0])).resolve() for _, t in links(ROOT / "README.md")
              if not EXTERNAL.match(t)}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link to: {missing}"


def test_slugs_are_githubs():
    assert slug("Pretrained models: Hugging Face folders and GGUF files") == \
        "pretrained-models-hugging-face-folders-and-gguf-files"
    assert slug("A real model: `scripts/real_model.sh`") == "a-real-model-scriptsreal_modelsh"
    assert slug("Tensor parallelism (DeepSpeed-Inference)") == "tensor-parallelism-deepspeed-inference"
    assert slug("Quickstart (PT → SFT → DPO → RAG)") == "quickstart-pt--sft--dpo--rag"
    assert slug("The quickstart's report") == "the-quickstarts-report"
    assert slug("`rag ask`") == "rag-ask"


def test_a_broken_link_is_found(tmp_path, monkeypatch):
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    (tmp_path / "README.md").write_text("# Title\n\n## A section\n")
    page.write_text("[ok](../README.md#a-section) [here](#top)\n\n# Top\n\n"
                    "[gone](missing.md) [no heading](../README.md#b-section)\n"
                    "`[in code](missing.md)`\n\n```\n[in a block](missing.md)\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    problems = broken_links(page)
    assert len(problems) == 2 and "missing.md does not exist" in problems[0] and "#b-section" in problems[1]


if __name__ == "__main__":
    found = [msg for page in PAGES for msg in broken_links(page)]
    print("\n".join(found) or f"{len(PAGES)} pages, every relative link resolves")
    sys.exit(1 if found else 0)
