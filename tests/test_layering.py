"""Imports run one way: cli -> training | inference | convert -> run_dir | launch_env | model | data -> config ->
errors | extensions. A module may import its own package and anything in a lower layer, never a higher layer or a
sibling of its own layer (except model and data, which the model folder's loader joins: a folder holds a tokenizer;
and training, which drives the inference engine for GRPO's rollouts and scores them as evaluation does: inference
never imports training)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "astrai_ds"
LAYER = {"errors": 0, "extensions": 0, "config": 1, "data": 2, "model": 2, "run_dir": 2, "launch_env": 2, "training": 3,
         "inference": 3, "convert": 3, "rag": 4, "serve": 5, "cli": 6, "__main__": 7, "__init__": 0}
SIBLINGS_ALLOWED = {("model", "data"), ("data", "model"), ("training", "inference")}


def _part(module: str) -> str:
    part = module.split(".")[1] if module.count(".") else "__init__"
    return part if part in LAYER else "__init__"  # a name defined in astrai_ds/__init__.py


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "astrai_ds" else [f"astrai_ds.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names if n.startswith("astrai_ds")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("astrai_ds")]
    return found


def test_imports_run_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        here = rel.parts[0].removesuffix(".py")
        for lineno, module in imports(path):
            there = _part(module)
            if there in (here, "errors") or (here == "__init__" and there == "__init__"):
                continue
            if LAYER[there] < LAYER[here] or (LAYER[there] == LAYER[here] and (here, there) in SIBLINGS_ALLOWED):
                continue
            wrong.append(f"astrai_ds/{rel}:{lineno} imports {module} ({here} may not import {there})")
    assert not wrong, "\n".join(wrong)


def test_model_and_data_know_nothing_of_deepspeed():
    for part in ("model", "data"):
        for path in (PACKAGE / part).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            assert "import deepspeed" not in text and "from deepspeed" not in text, path


def test_only_ds_inference_imports_deepspeed_in_inference():
    # The engine runs on a plain model; DeepSpeed-Inference (tensor parallelism) is an optional wrapper.
    for path in (PACKAGE / "inference").rglob("*.py"):
        if path.name != "ds_inference.py":
            text = path.read_text(encoding="utf-8")
            assert "import deepspeed" not in text and "from deepspeed" not in text, path
