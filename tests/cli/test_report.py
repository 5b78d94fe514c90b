"""`astrai-ds report`: a missing, invalid or wrong JSON file gets one clear line and leaves report.json as it
was; a good one adds the stage's row."""

from __future__ import annotations

import json

import pytest

from conftest import cli_in_process, expect_user_error
EVAL = {"eval_loss": 2.5, "exact_match": 0.25, "n": 4}


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/tokens_per_sec": 100.0 * s}) + "\n"
                                               for s in (1, 2, 3)))
    return run


def _report(capsys, run_dir, eval_path, out):
    return cli_in_process(capsys, "report", "--stage", "pt", "--run", str(run_dir), "--eval", str(eval_path), "--out",
                          str(out))


@pytest.mark.parametrize("content, fragments", [
    (None, ["not found", "astrai-ds eval ... --out FILE"]),
    ("{not json", ["is not valid JSON", "line 1 column 2"]),
    ("[0.5]", ["holds a JSON list, not an object"]),
    (json.dumps({"pt": EVAL}), ["holds none of the metrics", "eval_loss"]),  # a report.json, not an eval result
    (json.dumps({"eval_loss": "low"}), ["eval_loss is \"low\", not a number"]),
])
def test_report_refuses_a_bad_eval_file(run_dir, tmp_path, capsys, content, fragments):
    eval_path = tmp_path / "eval.json"
    if content is not None:
        eval_path.write_text(content)
    out = tmp_path / "report.json"
    out.write_text(json.dumps({"sft": {"eval_loss": 1.0}}))
    expect_user_error(_report(capsys, run_dir, eval_path, out), "--eval", str(eval_path), *fragments)
    assert json.loads(out.read_text()) == {"sft": {"eval_loss": 1.0}}


@pytest.mark.parametrize("content, fragment", [("{", "is not valid JSON"), ('{"pt": 3}', "is not a report")])
def test_report_refuses_a_bad_report_to_update(run_dir, tmp_path, capsys, content, fragment):
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    out = tmp_path / "report.json"
    out.write_text(content)
    expect_user_error(_report(capsys, run_dir, tmp_path / "eval.json", out), "--out", str(out), fragment)
    assert out.read_text() == content


def test_report_needs_the_run_folder(tmp_path, capsys):
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    proc = _report(capsys, tmp_path / "nope", tmp_path / "eval.json", tmp_path / "report.json")
    expect_user_error(proc, "--run", "metrics.jsonl not found", "output_dir")
    assert not (tmp_path / "report.json").exists()


def test_report_adds_the_stage(run_dir, tmp_path, capsys):
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    out = tmp_path / "report.json"
    out.write_text(json.dumps({"sft": {"eval_loss": 1.0}}))
    proc = _report(capsys, run_dir, tmp_path / "eval.json", out)
    assert proc.returncode == 0, proc.stderr
    # tokens/s: the median of the logs after the first (warm-up) one
    assert json.loads(out.read_text()) == {"sft": {"eval_loss": 1.0},
                                           "pt": {"eval_loss": 2.5, "exact_match": 0.25, "tokens_per_sec": 250.0}}
    assert "2.5000" in proc.stdout and "250" in proc.stdout


def test_a_rag_entry_gets_its_own_line_not_an_empty_row():
    from astrai_ds.cli.report import format_table

    rag = {"answer_em_closed_book": 0.0, "answer_em_rag": 0.5, "answer_em_oracle": 1.0, "recall_at_5": {"bm25": 1.0},
           "wall_time_s": 11}
    lines = format_table({"pt": {"eval_loss": 1.5, "wall_time_s": 30}, "rag": rag}).splitlines()
    assert [line.split()[0] for line in lines[1:] if line and not line.startswith("rag:")] == ["pt"]
    assert any(line.startswith("rag: closed_book 0.000, rag 0.500, oracle 1.000") for line in lines)
