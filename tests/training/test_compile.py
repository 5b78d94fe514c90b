"""`compile`: the model compiled with torch.compile through DeepSpeed's engine gives the eager run's losses on 2
ranks; a CPU without a C++ compiler trains eager and says so in one line; pipeline stages refuse it."""

from __future__ import annotations

import types

import pytest
import torch

from conftest import launch, tiny_model, tiny_train_config, train_losses

from astrai_ds.config.base import from_dict
from astrai_ds.config.train import TrainConfig


@pytest.mark.multiproc
def test_a_compiled_run_gives_the_eager_losses(workspace, trained, tmp_path):
    eager = train_losses(trained("zero2.json"))  # shared with test_multiproc's ZeRO parity
    proc = launch(tiny_train_config(workspace, tmp_path, compile=True), ds_config="zero2.json")
    assert "compile: torch.compile (inductor) compiles the model" in proc.stdout
    assert "compile: the first step took" in proc.stdout
    compiled = train_losses(tmp_path / "run")
    assert sorted(compiled) == sorted(eager)
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-4), step


def test_the_first_compiled_graph_is_not_compiled_again(workspace, monkeypatch):
    """`_compile` builds RoPE's tables (cached per device) before compiling: built inside the first compiled forward,
    the cache's guard failed on the next call and the first graph compiled twice (here counted by a backend that
    compiles nothing, so the count is exact and quick)."""
    from torch._dynamo.testing import CompileCounter

    from astrai_ds.training import run

    monkeypatch.setattr(run, "no_cpp_compiler", lambda *a: None)  # nothing is compiled with C++ here
    torch._dynamo.reset()
    model, counter = tiny_model(workspace), CompileCounter()
    engine = types.SimpleNamespace(device=torch.device("cpu"), module=model,
                                   compile=lambda: model.compile(backend=counter))
    run._compile(engine, types.SimpleNamespace(is_main=False))
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        for _ in range(3):
            model(ids)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_without_a_cpp_compiler_training_runs_eager(monkeypatch, capsys):
    import torch._inductor.cpp_builder as cpp_builder

    from astrai_ds.training.run import _compile

    def no_compiler():
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    calls = []
    engine = types.SimpleNamespace(device=torch.device("cpu"), compile=lambda: calls.append("compile"))
    _compile(engine, types.SimpleNamespace(is_main=True))
    out = capsys.readouterr().out
    assert calls == [] and out.count("\n") == 1
    assert "no C++ compiler for torch.compile" in out and "training runs eager" in out and "apt-get install g++" in out


def test_compile_refuses_pipeline_stages():
    from astrai_ds.config.base import FieldError
    from astrai_ds.errors import ConfigError

    with pytest.raises((ConfigError, FieldError), match="compile.*pipeline stages"):
        from_dict(TrainConfig, {"model": "m", "tokenizer": "t", "data": {"path": "d"}, "output_dir": "o",
                                "compile": True, "parallel": {"pipeline_stages": 2}})
