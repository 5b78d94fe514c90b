"""`astrai-ds export`: where the model folder may go (a new or empty folder, or a model folder to overwrite;
never a file or a folder of something else), and its files follow the umask."""

from __future__ import annotations

import os
import stat

import pytest

from astrai_ds.config.model import ModelConfig
from astrai_ds.convert.export import export_run
from astrai_ds.model.io import MODEL_FILES, read_model_config
from conftest import cli_in_process, expect_user_error


def test_export_to_an_existing_file_is_refused(run_dir, tmp_path, capsys):
    taken = tmp_path / "model"
    taken.write_text("not a folder")
    proc = cli_in_process(capsys, "export", "--run", str(run_dir), "--out", str(taken))
    expect_user_error(proc, str(taken), "is a file, not a folder", "--out")
    assert taken.read_text() == "not a folder"


def test_export_into_a_folder_of_something_else_is_refused(run_dir, tmp_path, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    proc = cli_in_process(capsys, "export", "--run", str(run_dir), "--out", str(other))
    expect_user_error(proc, str(other), "todo.txt", "not a model folder", "new or empty folder")
    assert sorted(p.name for p in other.iterdir()) == ["todo.txt"]


def test_export_overwrites_a_model_folder(run_dir, tmp_path):
    out = tmp_path / "model"
    export_run(run_dir, out)
    first = (out / "model.safetensors").read_bytes()
    (out / "config.json").write_text("{}")  # an older export, say
    export_run(run_dir, out)  # a model folder: its files are replaced
    assert (out / "model.safetensors").read_bytes() == first
    assert read_model_config(out) == ModelConfig.load(run_dir / "model_config.json")
    (tmp_path / "empty").mkdir()
    export_run(run_dir, tmp_path / "empty")  # an empty folder is fine too


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_follow_the_umask(run_dir, tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = export_run(run_dir, tmp_path / "model")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {name: 0o666 & ~umask for name in MODEL_FILES}


def test_zero3_sub_groups_are_cut_as_deepspeed_cuts_them():
    """An NVMe-offloaded checkpoint's swap files hold whole sub-groups: export must know each one's length."""
    import torch

    from astrai_ds.convert.export import _sub_group_numels

    shapes = [{"a": torch.Size([10, 10]), "b": torch.Size([7]), "c": torch.Size([30])}, {"norm": torch.Size([5])}]
    # on 2 ranks each rank holds ceil(numel / 2) of a parameter: 50, 4 and 15 of the first group, 3 of the second
    assert _sub_group_numels(shapes, 2, 10**9) == [69, 3]
    assert _sub_group_numels(shapes, 2, 50) == [50, 19, 3]  # a sub-group ends once it reaches sub_group_size
    assert _sub_group_numels(shapes, 2, 54) == [54, 15, 3]
    assert _sub_group_numels(shapes, 1, 100) == [100, 37, 5]


def test_a_model_folder_is_written_whole_or_not_at_all(tmp_path):
    """export and import write into a hidden folder first: an interrupted write leaves the folder as it was and
    nothing half-written; a model folder's other files are kept; a killed write's leftovers go at the next one."""
    from astrai_ds.convert.export import write_model_folder

    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    (out / "README.md").write_text("mine")

    def interrupted(folder):
        (folder / "config.json").write_text("new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_model_folder(out, interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (out / "config.json").read_text() == "old"
    (tmp_path / ".model.part").mkdir()  # as a SIGKILL leaves it
    (tmp_path / ".model.part" / "model.safetensors").write_text("half")
    write_model_folder(out, lambda folder: (folder / "config.json").write_text("new"))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json"]
    assert (out / "config.json").read_text() == "new" and (out / "README.md").read_text() == "mine"
    write_model_folder(tmp_path / "fresh", lambda folder: (folder / "config.json").write_text("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "model"]
