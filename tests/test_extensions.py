"""DeepSpeed's compiled ops are built once per machine and Python environment: their folder lies outside the
checkout, is named after the versions, the CPU and the DeepSpeed installation they were built for, and a second clone
of the project run with the same environment loads them without building again."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from astrai_ds.extensions import ENV_VAR, extensions_dir, install_key, use_extensions_cache
from conftest import ROOT, env

# Loads (building it the first time on this machine) DeepSpeed's CPU communication op, which every launch of more
# than one rank uses, the way train.py finds its folder: TORCH_EXTENSIONS_DIR unset, then use_extensions_cache().
LOAD = ("import astrai_ds; from astrai_ds.extensions import use_extensions_cache; print(astrai_ds.__file__); "
        "print(use_extensions_cache()); from deepspeed.accelerator import get_accelerator; "
        "get_accelerator().create_op_builder('ShareMemCommBuilder').load()")


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


def test_a_second_clone_with_the_same_environment_loads_the_compiled_ops_without_building_them(tmp_path):
    child_env = {k: v for k, v in env().items() if k != ENV_VAR}
    first = subprocess.run([sys.executable, "-c", LOAD], cwd=ROOT, env=child_env, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    folder = Path(first.stdout.splitlines()[1])
    assert folder == extensions_dir()
    built = {p: p.stat().st_mtime_ns for p in folder.rglob("*.so")}
    assert any(p.parent.name == "deepspeed_shm_comm" for p in built), sorted(built)

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{ROOT}", str(clone)], check=True, timeout=120)
    second = subprocess.run([sys.executable, "-c", LOAD], cwd=clone, env={**child_env, "PYTHONPATH": str(clone)},
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    assert Path(second.stdout.splitlines()[0]).is_relative_to(clone)  # the clone's own package ran
    assert Path(second.stdout.splitlines()[1]) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.so")} == built  # loaded, not built again
    assert not list(clone.rglob("*.so"))
