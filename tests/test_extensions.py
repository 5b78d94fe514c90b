"""DeepSpeed's compiled ops are built once per machine and Python environment: their folder lies outside the
checkout, is named after the versions, the CPU and the DeepSpeed installation they were built for, and a second clone
of the project run with the same environment loads them without building again."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from astrai_ds.extensions import ENV_VAR, extensions_dir, install_key, use_extensions_cache
from conftest import ROOT, env

# Loads (building them the first time on this machine) DeepSpeed's ops named in argv, by builder name, the way
# train.py finds their folder: TORCH_EXTENSIONS_DIR unset, then use_extensions_cache().
LOAD = ("import sys, astrai_ds; from astrai_ds.extensions import use_extensions_cache; print(astrai_ds.__file__); "
        "print(use_extensions_cache()); from deepspeed.accelerator import get_accelerator; "
        "[get_accelerator().create_op_builder(name).load() for name in sys.argv[1:]]")


def test_the_folder_is_outside_the_checkout_and_named_after_what_the_ops_depend_on(monkeypatch, tmp_path):
    folder = extensions_dir()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    assert ROOT not in folder.parents and folder.parent == cache / "astrai_ds" / "torch_extensions"
    assert folder.name.startswith(f"py{sys.version_info.major}.{sys.version_info.minor}-torch{version('torch')}-"
                                  f"deepspeed{version('deepspeed')}-")
    import deepspeed

    where = str(Path(deepspeed.__file__).resolve().parent)  # its include paths are in every compile command
    assert folder.name.endswith(f"-env{install_key()}")
    assert install_key() == hashlib.sha256(where.encode()).hexdigest()[:8]
    # what scripts/env.sh exports
    out = subprocess.run([sys.executable, "-m", "astrai_ds.extensions"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(folder)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert extensions_dir() == tmp_path / "astrai_ds" / "torch_extensions" / folder.name
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert use_extensions_cache() == extensions_dir() and os.environ[ENV_VAR] == str(extensions_dir())
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "mine"))  # a user's own choice wins
    assert use_extensions_cache() == tmp_path / "mine" and extensions_dir() != tmp_path / "mine"


@pytest.mark.multiproc  # slow: sets up a second checkout's environment
@pytest.mark.async_io
def test_a_second_clone_sets_up_on_the_shared_environment_and_loads_the_compiled_ops_without_building_them(
        tmp_path):
    """scripts/env.sh in a second checkout makes a .venv on top of the dependencies this one uses (installed once per
    machine) and holding only its own copy of the project; DeepSpeed's ops built by this checkout load there as
    they are."""
    mark = ROOT / ".venv" / ".astrai_ds_deps"
    if not mark.exists():
        pytest.skip("this checkout's .venv is self-contained (ASTRAI_SHARED_DEPS=0, or older than the shared "
                    "environment): remove it and run scripts/env.sh again to share")
    stamp = (ROOT / ".venv" / ".astrai_ds_installed").read_text().split()[0]
    if stamp != hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest():
        pytest.skip("this checkout's .venv was set up for another pyproject.toml: scripts/test.sh (or "
                    "`source scripts/env.sh test`) sets it up for this one, which a clone would share")
    child_env = {k: v for k, v in env().items() if k != ENV_VAR}
    # the CPU communication op, which every launch of more than one rank uses, and async_io where the NVMe tests
    # (which run last, as this test does) have built it: it takes about 7 minutes
    ops = ["ShareMemCommBuilder"] + ["AsyncIOBuilder"] * bool(list(extensions_dir().glob("async_io/*.so")))
    first = subprocess.run([sys.executable, "-c", LOAD, *ops], cwd=ROOT, env=child_env, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    folder = Path(first.stdout.splitlines()[1])
    assert folder == extensions_dir()
    built = {p: p.stat().st_mtime_ns for p in folder.rglob("*.so")}
    assert any(p.parent.name == "deepspeed_shm_comm" for p in built), sorted(built)

    # the second checkout: this one's tracked files as they are now
    clone = tmp_path / "clone"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    script = f"source scripts/env.sh test >&2 && python -c {shlex.quote(LOAD)} {' '.join(ops)}"
    second = subprocess.run(["bash", "-c", script], cwd=clone, env=child_env, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    assert (clone / ".venv" / ".astrai_ds_deps").read_text() == mark.read_text()
    assert not list((clone / ".venv").glob("lib/python*/site-packages/torch"))  # the dependencies are shared
    assert Path(second.stdout.splitlines()[0]).is_relative_to(clone)  # the clone's own package ran
    assert Path(second.stdout.splitlines()[1]) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.so")} == built  # loaded, not built again
    assert not [p for p in clone.rglob("*.so") if ".venv" not in p.relative_to(clone).parts]
