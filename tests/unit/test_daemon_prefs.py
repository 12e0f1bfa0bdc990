"""Computing preferences: the TOML file, validation, and `p2ptrain prefs` as a user runs it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from p2ptrain.daemon.prefs import PREFS, Preferences, parse_hours
from p2ptrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def p2ptrain(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "p2ptrain.cli", *args, "--home", str(home)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)


def test_a_missing_file_means_every_default():
    prefs = Preferences.load(Path("/nonexistent/prefs.toml"))
    assert prefs.values == {p.name: p.default for p in PREFS}
    assert prefs.run_on_batteries is False and prefs.suspend_cpu_usage == 25.0 and prefs.low_priority is True


def test_a_file_sets_only_what_it_names_and_round_trips(tmp_path):
    path = tmp_path / "prefs.toml"
    path.write_text('run_on_batteries = true\nstart_hour = 22\nend_hour = 6.5\nsat_hours = "0-24"\n')

    prefs = Preferences.load(path)
    prefs.save(tmp_path / "again.toml")

    assert prefs.changed == {"run_on_batteries", "start_hour", "end_hour", "sat_hours"}
    assert (prefs.run_on_batteries, prefs.start_hour, prefs.end_hour) == (True, 22.0, 6.5)
    assert prefs.day_hours(5) == (0.0, 24.0) and prefs.day_hours(0) == (22.0, 6.5)
    assert Preferences.load(tmp_path / "again.toml") == prefs
    assert stat.S_IMODE((tmp_path / "again.toml").stat().st_mode) == 0o600


@pytest.mark.parametrize("text, message", [
    ("colour = 3\n", "unknown preference 'colour'"),
    ("suspend_cpu_usage = 150\n", "suspend_cpu_usage = 150 is not allowed: must be a number in 0 … 100"),
    ("run_on_batteries = 3\n", "run_on_batteries = 3 is not allowed: must be true or false"),
    ("max_ncpus_pct = 0\n", "max_ncpus_pct = 0 is not allowed"),
    ("daily_xfer_period_days = 1.5\n", "must be a whole number"),
    ('mon_hours = "9 to 5"\n', "mon_hours = '9 to 5' is not allowed: must be 'H[:MM]-H[:MM]'"),
    ("idle_time_to_run = nan\n", "idle_time_to_run = nan is not allowed"),
    ("[section]\nx = 1\n", "[section] is not a preference"),
    ("run_on_batteries = \n", "not valid TOML"),
])
def test_a_bad_file_is_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "prefs.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        Preferences.load(path)
    assert message in str(caught.value) and str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_hour_spans():
    assert parse_hours("9-17") == (9.0, 17.0)
    assert parse_hours("22:30-6") == (22.5, 6.0)
    assert parse_hours("") is None
    with pytest.raises(ValueError):
        parse_hours("25-3")
    with pytest.raises(ValueError):
        parse_hours("9:75-10")


def test_prefs_cli_set_show_reset(tmp_path):
    # Execute: a user changes two preferences, looks, then resets one
    set_one = p2ptrain("prefs", "set", "run_if_user_active", "no", home=tmp_path)
    set_two = p2ptrain("prefs", "set", "cpu_usage_limit", "60", home=tmp_path)
    shown = p2ptrain("prefs", "show", home=tmp_path)
    reset = p2ptrain("prefs", "reset", "cpu_usage_limit", home=tmp_path)

    # Assert
    assert set_one.returncode == 0 and set_one.stdout.strip() == "run_if_user_active = false"
    assert set_two.returncode == 0 and set_two.stdout.strip() == "cpu_usage_limit = 60"
    assert shown.returncode == 0
    rows = {line.split()[0].lstrip("*"): line for line in shown.stdout.splitlines()[1:]}
    assert rows["run_if_user_active"].startswith("*") and "false" in rows["run_if_user_active"]
    assert rows["cpu_usage_limit"].startswith("*") and not rows["suspend_cpu_usage"].startswith("*")
    assert len(rows) == len(PREFS)
    assert reset.returncode == 0
    assert Preferences.load(tmp_path / "prefs.toml").changed == {"run_if_user_active"}


@pytest.mark.parametrize("args, message", [
    (["prefs", "set", "colour", "blue"], "error: prefs set: unknown preference 'colour'"),
    (["prefs", "set", "battery_charge_min_pct", "150"],
     "error: prefs set: battery_charge_min_pct = '150' is not allowed: must be a number in 0 … 100"),
    (["prefs", "set", "leave_apps_in_memory", "maybe"], "must be true or false"),
    (["prefs", "reset", "colour"], "unknown preference 'colour'"),
])
def test_prefs_cli_refuses_bad_input_in_one_line(tmp_path, args, message):
    done = p2ptrain(*args, home=tmp_path)
    assert done.returncode == 3
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "prefs.toml").exists()


def test_a_hand_edited_bad_file_stops_show_and_daemon_start_with_one_line(tmp_path):
    (tmp_path / "prefs.toml").write_text("suspend_cpu_usage = 'lots'\n")
    shown = p2ptrain("prefs", "show", home=tmp_path)
    started = p2ptrain("daemon", "start", "--new-swarm", home=tmp_path)
    for done in (shown, started):
        assert done.returncode == 3
        assert "suspend_cpu_usage = 'lots' is not allowed" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "daemon" / "daemon.pid").exists()


def test_prefs_set_repairs_a_hand_edited_bad_file_keeping_what_is_allowed(tmp_path):
    # Prepare: a hand edit broke one value; the other preferences are fine
    broken = "run_on_batteries = true\nsuspend_cpu_usage = 'lots'\ncolour = 3\n"
    (tmp_path / "prefs.toml").write_text(broken)

    # Execute: the user sets the broken key again
    done = p2ptrain("prefs", "set", "suspend_cpu_usage", "40", home=tmp_path)

    # Assert: the new value, the good one kept, the unknown key left out and named in one line
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "suspend_cpu_usage = 40"
    assert done.stderr.strip() == (f"prefs set: {tmp_path / 'prefs.toml'} was broken; repaired it, leaving out "
                                   "colour (unknown preference) (the old file is prefs.toml.broken)")
    repaired = Preferences.load(tmp_path / "prefs.toml")
    assert repaired.changed == {"run_on_batteries", "suspend_cpu_usage"}
    assert (repaired.run_on_batteries, repaired.suspend_cpu_usage) == (True, 40.0)
    assert (tmp_path / "prefs.toml.broken").read_text() == broken
    assert stat.S_IMODE((tmp_path / "prefs.toml.broken").stat().st_mode) == 0o600


def test_prefs_set_and_reset_repair_a_file_that_is_not_even_toml(tmp_path):
    # Prepare: one line is not TOML at all
    (tmp_path / "prefs.toml").write_text("# mine\nstart_hour = 9\nend_hour = \nrun_if_user_active = false\n")

    # Execute
    set_one = p2ptrain("prefs", "set", "cpu_usage_limit", "50", home=tmp_path)
    (tmp_path / "prefs.toml").write_text("start_hour = 9\nend_hour = \n")
    reset = p2ptrain("prefs", "reset", "end_hour", home=tmp_path)

    # Assert: every line that parses is kept; the broken line is named by its number
    assert set_one.returncode == 0 and "leaving out line 3, end_hour (not TOML)" in set_one.stderr
    assert len(set_one.stderr.strip().splitlines()) == 1
    assert reset.returncode == 0 and reset.stdout.startswith("end_hour reset to the default")
    assert "repaired it (the old file is prefs.toml.broken)" in reset.stderr  # end_hour itself was the problem
    assert Preferences.load(tmp_path / "prefs.toml").values["start_hour"] == 9.0
    assert Preferences.load(tmp_path / "prefs.toml").changed == {"start_hour"}


def test_show_on_a_bad_file_says_how_to_repair_it(tmp_path):
    (tmp_path / "prefs.toml").write_text("suspend_cpu_usage = 'lots'\n")
    shown = p2ptrain("prefs", "show", home=tmp_path)
    assert shown.returncode == 3 and "`p2ptrain prefs set KEY VALUE` or `prefs reset KEY` repairs" in shown.stderr
    assert len(shown.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["daemon", "status"], ["daemon", "stop"],
                                     ["daemon", "logs"], ["daemon", "mode", "never"]])
def test_looking_at_a_home_that_does_not_exist_does_not_create_it(tmp_path, command):
    # Execute
    missing = tmp_path / "no such home"
    done = p2ptrain(*command, home=missing)

    # Assert: status says nobody runs there; the others refuse in one line; nothing is created
    assert not missing.exists()
    assert "Traceback" not in done.stderr
    if command[-1] == "status":
        assert done.returncode == 0
        assert done.stdout.strip() == f"p2ptrain: stopped (no node runs in {missing}: the directory does not exist)"
    elif "--json" in command:
        assert done.returncode == 0
        assert json.loads(done.stdout)["state"] == "stopped" and json.loads(done.stdout)["home_exists"] is False
    else:
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
