"""GRPO runs on CPU ranks: rollouts through the generation engine, whole groups per rank, the loss over the global
batch's completion tokens. A 2-rank run equals a 1-rank run with the same global batch; a run stopped between the
iterations of one rollout batch (ZeRO-3, with a KL term against a live reference) resumes exactly; LoRA's reference
is the policy with its adapters off; bad input is one line."""

from __future__ import annotations

import json
import re

import pytest

from conftest import copy_run, launch, read_metrics, run_python, tiny_train_config, train_in_process, train_losses

pytestmark = pytest.mark.multiproc

# A reward with spread on a random model's completions: their lengths differ, so most groups carry a signal.
REWARD = '''
def length_reward(prompt, response, record):
    assert isinstance(prompt, list) and "answer" in record
    return (len(response) % 7) / 6
'''


@pytest.fixture(scope="module")
def grpo_setup(workspace, model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    (root / "my_rewards.py").write_text(REWARD)
    return root


def grpo_config(workspace, model_dir, setup, out, **over):
    settings = dict(model=None, stage={"type": "grpo", "init_from": str(model_dir)},
                    data__path=str(workspace / "corpus" / "grpo.jsonl"), data__eval_path=None, data__seq_len=128,
                    max_steps=2, save_interval=1, schedule__total_steps=4, micro_batch_size=4, grad_accum_steps=2,
                    grpo={"group_size": 4, "max_new_tokens": 16,
                          "rewards": {f"{setup / 'my_rewards.py'}:length_reward": 1.0, "exact": 1.0}})
    settings.update(over)
    return tiny_train_config(workspace, out, **settings)


def test_two_ranks_equal_one_rank_with_the_same_global_batch(workspace, model_dir, grpo_setup, tmp_path):
    """2 ranks x 2 micro-batches of 4 completions (one group each) against 1 rank x 4: the same prompts, the same
    completions (each has its own seed), the same loss, rewards and weights. The 1-rank run's rollouts decode through
    compiled graphs (`compile_rollouts`), whose weights are read anew each rollout: the same completions again."""
    two = grpo_config(workspace, model_dir, grpo_setup, tmp_path / "two")
    launch(two, ds_config="zero2.json", nproc=2, launcher="deepspeed")
    grpo = {"group_size": 4, "max_new_tokens": 16, "compile_rollouts": True,
            "rewards": {f"{grpo_setup / 'my_rewards.py'}:length_reward": 1.0, "exact": 1.0}}
    one = grpo_config(workspace, model_dir, grpo_setup, tmp_path / "one", grad_accum_steps=4, grpo=grpo)
    proc = launch(one, ds_config="zero2.json", nproc=1)
    assert "could not be compiled" not in proc.stdout + proc.stderr
    records = {name: {r["step"]: r for r in read_metrics(tmp_path / name / "run") if "train/loss" in r}
               for name in ("one", "two")}
    assert sorted(records["one"]) == sorted(records["two"]) == [1, 2]
    for step in (1, 2):
        a, b = records["one"][step], records["two"][step]
        for key in ("train/loss", "grpo/reward", "grpo/reward_std", "grpo/reward/exact", "grpo/completion_length",
                    "grpo/groups_all_equal", "train/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (step, key)
    first = records["two"][1]
    assert first["grpo/reward_std"] > 0 and first["grpo/groups_all_equal"] < 1  # the groups carry a signal
    assert first["train/grad_norm"] > 0
    for key in ("grpo/kl", "grpo/clip_fraction", "grpo/truncated", "grpo/rollout_tokens_per_sec",
                "grpo/rollout_seconds", "grpo/train_seconds", "grpo/reward/my_rewards.length_reward"):
        assert key in first, key


def test_training_raises_the_reward(workspace, model_dir, grpo_setup, tmp_path):
    """The direction of the update: rewarded for Chinese characters, a random model writes more of them within a
    few steps."""
    (tmp_path / "digits.py").write_text("def share(prompt, response, record):\n"
                                        "    return sum('\\u4e00' <= c <= '\\u9fff' for c in response) / "
                                        "max(len(response), 1)\n")
    config = grpo_config(workspace, model_dir, grpo_setup, tmp_path / "digits", max_steps=24, save_interval=24,
                         optimizer={"lr": 0.01}, schedule={"type": "constant", "warmup_steps": 0},
                         grpo={"group_size": 4, "max_new_tokens": 16,
                               "rewards": {f"{tmp_path / 'digits.py'}:share": 1.0}})
    run_python("train.py", ["--config", str(config), "--ds_config", "zero0.json"])
    rewards = [r["grpo/reward"] for r in read_metrics(tmp_path / "digits" / "run") if "grpo/reward" in r]
    assert len(rewards) == 24
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.15, rewards


def test_zero3_with_a_kl_term_and_two_iterations_per_rollout_resumes_exactly(workspace, model_dir, grpo_setup,
                                                                             tmp_path):
    """num_iterations 2: step 1 rolls out and trains, step 2 trains again on the same completions from the stored
    old log-probs (its ratio moves off 1: clipping can start), step 3 rolls out anew. Resumed from the checkpoint
    of step 1, between the two iterations, the run continues as the uninterrupted one."""
    over = dict(max_steps=3, keep_checkpoints=0,
                grpo={"group_size": 4, "max_new_tokens": 16, "num_iterations": 2, "beta": 0.04,
                      "rewards": {f"{grpo_setup / 'my_rewards.py'}:length_reward": 1.0}})
    full = grpo_config(workspace, model_dir, grpo_setup, tmp_path / "full", **over)
    launch(full, ds_config="zero3.json")
    split = grpo_config(workspace, model_dir, grpo_setup, tmp_path / "split", **over)
    copy_run(tmp_path / "full" / "run", tmp_path / "split", 1)
    proc = launch(split, ds_config="zero3.json")
    assert "resumed from" in proc.stdout and "at step 1" in proc.stdout
    expected, resumed = train_losses(tmp_path / "full" / "run"), train_losses(tmp_path / "split" / "run")
    for step in (2, 3):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), step
    records = {r["step"]: r for r in read_metrics(tmp_path / "full" / "run") if "train/loss" in r}
    assert records[1]["grpo/kl"] == pytest.approx(0, abs=1e-6)  # the policy starts as the reference
    assert records[2]["grpo/kl"] > 0  # one step later it has moved
    # the second iteration trains on the first one's completions: the same rollout metrics, no rollout time
    assert records[2]["grpo/reward"] == records[1]["grpo/reward"]
    assert records[2]["grpo/rollout_seconds"] == 0 and records[1]["grpo/rollout_seconds"] > 0
    assert records[3]["grpo/rollout_seconds"] > 0


def test_lora_grpo_uses_the_base_as_its_reference_and_exports(workspace, model_dir, grpo_setup, tmp_path):
    """Under LoRA the KL term's reference is the policy with its adapters off: no second model; one rank without
    ZeRO."""
    from astrai_ds.convert.export import export_run

    config = grpo_config(workspace, model_dir, grpo_setup, tmp_path / "lora", lora={"r": 4},
                         grpo={"group_size": 4, "max_new_tokens": 16, "beta": 0.1,
                               "rewards": {f"{grpo_setup / 'my_rewards.py'}:length_reward": 1.0}})
    proc = run_python("train.py", ["--config", str(config), "--ds_config", "zero0.json"])
    assert "LoRA r 4" in proc.stdout
    assert re.search(r"step 2/2 loss \S+ reward [0-9.]+ lr", proc.stdout), proc.stdout[-2000:]  # the progress line
    records = {r["step"]: r for r in read_metrics(tmp_path / "lora" / "run") if "train/loss" in r}
    assert records[1]["grpo/kl"] == pytest.approx(0, abs=1e-7) and records[2]["grpo/kl"] > 0
    export_run(tmp_path / "lora" / "run", tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.parametrize("change,fragment", [
    ({"grpo": {"group_size": 1}}, "grpo.group_size"),
    ({"grpo": {"rewards": {"no_such_module_xyz:f": 1.0}}}, "no_such_module_xyz"),
    ({"grpo": {"rewards": {"exactly": 1.0}}}, "exactly"),
    ({"data__path": "SFT"}, "answer"),
    ({"parallel": {"pipeline_stages": 2}}, "GRPO does not run on pipeline stages"),
])
def test_bad_grpo_input_is_one_line(workspace, model_dir, grpo_setup, tmp_path, capsys, change, fragment):
    if change.get("data__path") == "SFT":
        change = {"data__path": str(workspace / "corpus" / "sft.jsonl")}
    config = grpo_config(workspace, model_dir, grpo_setup, tmp_path / "bad", **change)
    proc = train_in_process(capsys, "--config", str(config))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "bad" / "run").exists()  # nothing written


def test_a_reward_that_fails_stops_the_run_with_its_name_and_the_record(workspace, model_dir, grpo_setup, tmp_path):
    (tmp_path / "bad_reward.py").write_text("def broken(prompt, response, record):\n    return {'score': 1}\n")
    config = grpo_config(workspace, model_dir, grpo_setup, tmp_path / "fails",
                         grpo={"group_size": 4, "max_new_tokens": 4,
                               "rewards": {f"{tmp_path / 'bad_reward.py'}:broken": 1.0}})
    proc = run_python("train.py", ["--config", str(config), "--ds_config", "zero0.json"], check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad_reward.py:broken" in errors[0] and "grpo.jsonl record" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_lora_on_a_folder_whose_weights_do_not_fit_its_config_is_one_line(workspace, model_dir, grpo_setup, tmp_path):
    import shutil

    folder = tmp_path / "mismatched"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] += 16  # the weights stay the old shape
    (folder / "config.json").write_text(json.dumps(config))
    train = grpo_config(workspace, model_dir, grpo_setup, tmp_path / "lora", lora={"r": 4},
                        stage={"type": "grpo", "init_from": str(folder)})
    proc = run_python("train.py", ["--config", str(train), "--ds_config", "zero0.json"], check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "do not fit the model of its config.json" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "lora" / "run").glob("global_step*"))  # nothing trained, no checkpoint


def test_a_step_that_is_not_whole_groups_is_one_line_before_the_run_folder_is_written(workspace, model_dir,
                                                                                      grpo_setup, tmp_path):
    config = grpo_config(workspace, model_dir, grpo_setup, tmp_path / "groups",
                         grpo={"group_size": 3, "rewards": {"exact": 1.0}})  # 4 x 2 completions a rank
    proc = run_python("train.py", ["--config", str(config), "--ds_config", "zero0.json"], check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not a whole number of groups of grpo.group_size 3" in errors[0], proc.stderr
    assert not (tmp_path / "groups" / "run").exists()  # not even the folder and its lock file
