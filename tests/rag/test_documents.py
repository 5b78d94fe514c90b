"""Reading documents for an index: a file named twice is read once; a byte-order mark is not text; a symbolic link
that leads nowhere is named for what it is."""

from __future__ import annotations

import os

import pytest

from astrai_ds.cli.main import main
from astrai_ds.errors import UserError
from astrai_ds.rag.chunking import ChunkParams, chunk_document
from astrai_ds.rag.documents import read_documents


def test_a_file_named_twice_is_read_once(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.md").write_text("# A\n\nAlpha.\n")
    (docs / "sub" / "b.txt").write_text("Beta.\n")
    (tmp_path / "link.md").symlink_to(docs / "a.md")
    got, skipped = read_documents([docs, docs / "a.md", tmp_path / "docs" / "sub" / ".." / "sub" / "b.txt",
                                   tmp_path / "link.md", docs])
    assert [d.source for d in got] == [str(docs / "a.md"), str(docs / "sub" / "b.txt")] and skipped == []


def test_a_byte_order_mark_is_not_text(tmp_path, workspace):
    from astrai_ds.data.tokenizer import Tokenizer

    (tmp_path / "bom.md").write_bytes("\ufeff# Vela\n\nVela is a mountain country.\n".encode())
    (tmp_path / "bom.jsonl").write_bytes("\ufeff{\"text\": \"Kiro floods every spring.\"}\n".encode())
    docs, skipped = read_documents([tmp_path / "bom.md", tmp_path / "bom.jsonl"])
    assert skipped == [] and [d.text for d in docs] == ["# Vela\n\nVela is a mountain country.\n",
                                                         "Kiro floods every spring."]
    chunks = chunk_document(docs[0].text, docs[0].source, Tokenizer.load(workspace / "tokenizer"), ChunkParams())
    assert [c.headings for c in chunks] == [("Vela",)]


def test_a_symbolic_link_loop_is_named(tmp_path, model_dir, capsys):
    os.symlink("loop", tmp_path / "loop")
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    os.symlink("gone.md", tmp_path / "dangling")
    with pytest.raises(UserError, match=rf"^--docs {tmp_path}/loop: a loop of symbolic links \({tmp_path}/loop -> "
                                        rf"loop\); give the file or folder it should point to$"):
        read_documents([tmp_path / "loop"])
    with pytest.raises(UserError, match=r"a loop of symbolic links \(.*/a -> b -> a\)"):
        read_documents([tmp_path / "a"])
    with pytest.raises(UserError, match=r"/dangling: a symbolic link to gone.md, which does not exist"):
        read_documents([tmp_path / "dangling"])
    with pytest.raises(UserError, match=r"/loop/x.md: a loop of symbolic links on the way to it"):
        read_documents([tmp_path / "loop" / "x.md"])
    with pytest.raises(UserError, match=r"/nowhere: no such file or folder"):
        read_documents([tmp_path / "nowhere"])
    # inside a folder, such links are skipped with the reason
    (tmp_path / "real.md").write_text("Real text.\n")
    docs, skipped = read_documents([tmp_path])
    assert [d.source for d in docs] == [str(tmp_path / "real.md")]
    assert sorted(skipped) == [f"{tmp_path}/a: a loop of symbolic links ({tmp_path}/a -> b -> a)",
                               f"{tmp_path}/b: a loop of symbolic links ({tmp_path}/b -> a -> b)",
                               f"{tmp_path}/dangling: a symbolic link to gone.md, which does not exist",
                               f"{tmp_path}/loop: a loop of symbolic links ({tmp_path}/loop -> loop)"]
    # the command says it in one line
    assert main(["rag", "index", "--docs", str(tmp_path / "loop"), "--model", str(model_dir), "--out",
                 str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: --docs {tmp_path}/loop: a loop of symbolic links ({tmp_path}/loop "
                                        f"-> loop); give the file or folder it should point to"]
