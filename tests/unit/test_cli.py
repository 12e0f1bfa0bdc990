"""The command line: JSON output, a tiny train-then-eval run, and user errors as one
line with their exit code and no traceback."""

import json
import os
import subprocess
import sys

import pytest

from tests.unit.conftest import assert_one_line_error






def test_info_json_reports_params_of_the_default_2x2_run(cli, tmp_path):
    # Execute
    result = cli("info", "--json", "--home", tmp_path)

    # Assert
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # a block of width 128: 2 LayerNorms (2 x 2 x 128) + qkv, proj (4 x 128^2) + MLP (2 x 4 x 128^2) = 197 120
    block = 2 * 2 * 128 + 4 * 128 * 128 + 2 * 4 * 128 * 128
    stem = 257 * 128 + 2 * 128  # tied byte embedding + final LayerNorm
    assert report["params_per_path"] == stem + 2 * 2 * block == 821_632
    assert report["params_total"] == stem + 4 * 2 * block
    assert report["paths"] == ["0,0", "0,1", "1,0", "1,1"]
    assert [(m["module"], m["shared_by_paths"]) for m in report["modules"]] == [
        ("stem", 4), ("L0.M0", 2), ("L0.M1", 2), ("L1.M0", 2), ("L1.M1", 2)]
    assert report["tokens_per_round"] == 50 * 16 * 128


def test_info_json_for_the_gpu_preset_shows_8bit_optimizer_savings(cli, tmp_path):
    # Execute
    result = cli("info", "--json", "--run-config", "gpu", "--home", tmp_path)

    # Assert
    report = json.loads(result.stdout)
    # 2 levels x 6 blocks of width 1024, plus the tied byte embedding and final LayerNorm
    assert report["params_per_path"] == 12 * (2 * 2 * 1024 + 12 * 1024 * 1024) + 257 * 1024 + 2 * 1024
    assert report["optimizer_bytes_per_param"]["adamw"] == 8.0
    assert report["optimizer_bytes_per_param"]["adamw8bit"] == pytest.approx(2.03, abs=0.01)
    memory = report["memory_per_path_bytes"]
    assert memory["total_32bit"] - memory["total_8bit"] == memory["optimizer_32bit"] - memory["optimizer_8bit"]
    assert memory["total_8bit"] < 8 * 1024 ** 3  # the preset's promise: a path trains on an 8 GB card


def test_route_json_shards_generated_topics_evenly(cli, tmp_path, tiny_run_toml, topic_data_dir):
    # Execute
    result = cli("route", "--json", "--home", tmp_path / "home", "--run-config", tiny_run_toml,
                 "--data", topic_data_dir)

    # Assert
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["docs"] == 40 == summary["train_docs"] + summary["heldout_docs"]
    assert [p["path"] for p in summary["paths"]] == ["0,0", "0,1", "1,0", "1,1"]
    assert sum(p["docs"] for p in summary["paths"]) == summary["train_docs"]
    assert summary["min_share"] >= 0.15


def test_train_then_eval_on_a_tiny_run(cli, tmp_path, tiny_run_toml, topic_data_dir):
    # Prepare
    home = tmp_path / "home"
    common = ["--home", home, "--run-config", tiny_run_toml, "--data", topic_data_dir]

    # Execute
    trained = cli("train", "--steps", 2, "--device", "cpu", "--json", *common)
    evaluated = cli("eval", "--device", "cpu", "--json", *common)

    # Assert
    assert trained.exit_code == 0, trained.output
    result = json.loads(trained.stdout)
    assert (result["path"], result["steps"], result["round"]) == ("0,0", 2, 1)
    assert result["checkpoint"] == str(home / "runs" / "unit-cli" / "checkpoints" / "path-0-0" / "round-000001")
    assert os.path.isfile(os.path.join(result["checkpoint"], "manifest.json"))
    assert (home / "runs" / "unit-cli" / "run.json").is_file()

    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    rounds = {p["path"]: p["round"] for p in report["paths"]}
    assert rounds == {"0,0": 1, "0,1": None, "1,0": None, "1,1": None}
    assert report["untrained_paths"] == 3
    # 20 % of 40 documents are held out (by content hash), and routed by topic
    assert sorted(p["docs"] for p in report["paths"]) == [0, 2, 2, 4]  # token-balanced router (issue 15)
    trained = next(p for p in report["paths"] if p["path"] == "0,0")
    assert trained["loss"] < trained["init_loss"] - 0.2
    assert report["mixture_loss"] < report["mixture_init_loss"]


def test_second_train_resumes_from_the_checkpoint(cli, tmp_path, tiny_run_toml, topic_data_dir):
    # Prepare
    common = ["--home", tmp_path / "home", "--run-config", tiny_run_toml, "--data", topic_data_dir,
              "--device", "cpu", "--path", "1,1"]
    cli("train", "--steps", 2, "--json", *common)

    # Execute
    resumed = cli("train", "--steps", 2, *common)

    # Assert
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stdout.startswith("resuming path 1,1 from round 1 (step 2)\n")
    assert "path-1-1/round-000002" in resumed.stdout


def test_bad_run_config_exits_3_with_one_line(cli, tmp_path):
    # Prepare
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nd_model = 100\nn_heads = 3\n")

    # Execute
    result = cli("train", "--steps", 1, "--home", tmp_path / "home", "--run-config", bad)

    # Assert
    assert_one_line_error(result, 3, f"{bad}: model.d_model (100) must be divisible by model.n_heads (3)")


def test_unknown_key_in_run_config_exits_3(cli, tmp_path):
    # Prepare
    bad = tmp_path / "bad.toml"
    bad.write_text("[inner]\nsteps = 3\n")

    # Execute
    result = cli("info", "--home", tmp_path / "home", "--run-config", bad)

    # Assert
    assert_one_line_error(result, 3, f"{bad}: inner.steps: unknown key")


def test_empty_data_dir_exits_4_with_one_line(cli, tmp_path, tiny_run_toml):
    # Prepare
    empty = tmp_path / "empty"
    empty.mkdir()

    # Execute
    result = cli("train", "--steps", 1, "--home", tmp_path / "home", "--run-config", tiny_run_toml,
                 "--data", empty)

    # Assert
    assert_one_line_error(result, 4, f"no documents found in {empty}")


def test_too_few_documents_for_the_router_exits_4_with_one_line(cli, tmp_path, tiny_run_toml):
    # Prepare
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("only one document\n")

    # Execute
    result = cli("route", "--home", tmp_path / "home", "--run-config", tiny_run_toml, "--data", data)

    # Assert
    assert_one_line_error(result, 4, "need at least 4 training documents to fit the router")


def test_path_outside_the_grid_exits_2(cli, tmp_path, tiny_run_toml, topic_data_dir):
    # Execute
    result = cli("train", "--steps", 1, "--path", "2,0", "--home", tmp_path / "home",
                 "--run-config", tiny_run_toml, "--data", topic_data_dir)

    # Assert
    assert_one_line_error(result, 2, "path 2,0 is not in the grid [2, 2]")


def test_changed_config_under_the_same_run_id_exits_3(cli, tmp_path, tiny_run_toml, topic_data_dir):
    # Prepare
    home = tmp_path / "home"
    cli("route", "--home", home, "--run-config", tiny_run_toml, "--data", topic_data_dir)
    changed = tmp_path / "changed.toml"
    changed.write_text(tiny_run_toml.read_text().replace("seed = 0", "seed = 1"))

    # Execute
    result = cli("route", "--home", home, "--run-config", changed, "--data", topic_data_dir)

    # Assert
    assert_one_line_error(result, 3, f"{home / 'runs' / 'unit-cli' / 'run.json'} holds run 'unit-cli' "
                                     "with a different config than the one given (run.seed 0 saved, 1 given)")


def test_module_entry_point_runs_in_a_real_process(tmp_path):
    # Execute
    completed = subprocess.run([sys.executable, "-m", "p2ptrain.cli", "info", "--json", "--home", str(tmp_path)],
                               capture_output=True, text=True, timeout=120)

    # Assert
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["params_per_path"] == 821_632
