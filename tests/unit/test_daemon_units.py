"""`p2ptrain service install|uninstall`: a systemd --user unit that systemd-analyze accepts
(or whose contents are checked where systemd is missing) and a launchd plist that parses."""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from p2ptrain.daemon.units import STOP_TIMEOUT_S, launchd_plist, systemd_unit

REPO = Path(__file__).resolve().parents[2]
PEER = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def p2ptrain(*args: str, env_home: Path, **extra_env: str) -> subprocess.CompletedProcess:
    # a fake home, and no way to reach a real service manager (uninstall calls systemctl --user)
    env = dict(os.environ, PYTHONPATH=str(REPO), HOME=str(env_home), XDG_CONFIG_HOME=str(env_home / ".config"),
               XDG_DATA_HOME=str(env_home / ".local" / "share"), XDG_STATE_HOME=str(env_home / ".local" / "state"),
               XDG_RUNTIME_DIR=str(env_home / "no-runtime"), DBUS_SESSION_BUS_ADDRESS="unix:path=/nonexistent")
    env.pop("P2PTRAIN_HOME", None)
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "p2ptrain.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=120)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif "=" in line:
            key, value = line.split("=", 1)
            current.setdefault(key, []).append(value)
    return sections


def test_service_install_writes_a_user_unit_that_runs_the_daemon(tmp_path):
    # Execute: as a user would, with a home that has a space in it
    home = tmp_path / "my node"
    done = p2ptrain("service", "install", "--user", "--home", str(home), "--initial-peers", PEER, "--path", "1,0",
                    env_home=tmp_path)

    # Assert: the file, and how to enable it
    unit_path = tmp_path / ".config" / "systemd" / "user" / "p2ptrain.service"
    assert done.returncode == 0, done.stderr
    assert f"wrote {unit_path}" in done.stdout
    assert "systemctl --user enable --now p2ptrain.service" in done.stdout
    unit = parse_unit(unit_path.read_text())
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"][0])
    assert argv[:5] == [sys.executable, "-m", "p2ptrain.cli", "daemon", "run"]
    assert argv[argv.index("--home") + 1] == str(home)
    assert argv[argv.index("--initial-peers") + 1] == PEER and argv[argv.index("--path") + 1] == "1,0"
    assert service["KillMode"] == ["mixed"] and service["KillSignal"] == ["SIGTERM"]
    assert service["TimeoutStopSec"] == [str(STOP_TIMEOUT_S)] and service["Restart"] == ["on-failure"]
    assert service["Nice"] == ["19"] and service["IOSchedulingClass"] == ["idle"]
    assert service["RestartPreventExitStatus"] == ["2 3 4 5"]
    assert unit["Install"]["WantedBy"] == ["default.target"]

    # Assert: systemd itself accepts it, where systemd is installed
    analyze = shutil.which("systemd-analyze")
    if analyze:
        runtime = tmp_path / "xdg-runtime"
        runtime.mkdir(mode=0o700)
        verified = subprocess.run([analyze, "--user", "verify", str(unit_path)], capture_output=True, text=True,
                                  env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime), HOME=str(tmp_path)), timeout=60)
        assert verified.returncode == 0, verified.stderr
        assert "p2ptrain.service" not in verified.stderr  # no warning about our unit


def exec_start(tmp_path: Path) -> list[str]:
    unit_path = tmp_path / ".config" / "systemd" / "user" / "p2ptrain.service"
    return shlex.split(parse_unit(unit_path.read_text())["Service"]["ExecStart"][0])


def test_a_home_chosen_by_p2ptrain_home_goes_into_the_unit(tmp_path):
    # Execute: `P2PTRAIN_HOME=… p2ptrain service install`; systemd will not pass the variable on
    home = tmp_path / "env home"
    done = p2ptrain("service", "install", "--new-swarm", env_home=tmp_path, P2PTRAIN_HOME=str(home))

    # Assert: the daemon the unit runs uses the home whose preferences install checked
    assert done.returncode == 0, done.stderr
    argv = exec_start(tmp_path)
    assert argv[argv.index("--home") + 1] == str(home.resolve())
    assert argv.count("--home") == 1


def test_the_platform_default_home_is_left_to_the_platform(tmp_path):
    # Execute: neither --home nor $P2PTRAIN_HOME
    done = p2ptrain("service", "install", "--new-swarm", env_home=tmp_path)

    # Assert: no --home, so the daemon uses the platform's directories, as install did
    assert done.returncode == 0, done.stderr
    assert "--home" not in exec_start(tmp_path)
    assert (tmp_path / ".local" / "share" / "p2ptrain").is_dir()


def test_systemd_rejects_what_we_would_not_write(tmp_path):
    """The verification above is a real check: a unit with a relative ExecStart fails it."""
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed; the unit's contents are checked above")
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    bad = tmp_path / "p2ptrain.service"
    bad.write_text(systemd_unit([], user=True).replace(f"ExecStart={sys.executable}", "ExecStart=relative/python"))
    verified = subprocess.run([analyze, "--user", "verify", str(bad)], capture_output=True, text=True,
                              env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime), HOME=str(tmp_path)), timeout=60)
    assert verified.returncode != 0


def test_unit_quoting_of_odd_arguments():
    unit = systemd_unit(["--data", "/data/100% mine", "--run-id", "a$b"], user=True)
    exec_start = parse_unit(unit)["Service"]["ExecStart"][0]
    assert '"/data/100%% mine"' in exec_start and '"a$$b"' in exec_start


def test_a_system_unit_runs_as_the_installing_user():
    unit = parse_unit(systemd_unit([], user=False, run_as="volunteer"))
    assert unit["Service"]["User"] == ["volunteer"]
    assert unit["Unit"]["After"] == ["network-online.target"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_launchd_plist_is_valid_xml_with_what_launchd_needs(tmp_path):
    # Execute: through the CLI, as on a Mac (the target is chosen explicitly here)
    done = p2ptrain("service", "install", "--target", "launchd", "--home", str(tmp_path / "h"), "--new-swarm",
                    env_home=tmp_path)
    path = tmp_path / "Library" / "LaunchAgents" / "org.p2ptrain.daemon.plist"

    # Assert: plistlib parses it (the same format `plutil -lint` checks)
    assert done.returncode == 0, done.stderr
    assert "launchctl bootstrap gui/" in done.stdout
    plist = plistlib.loads(path.read_bytes())
    assert plist["Label"] == "org.p2ptrain.daemon"
    assert plist["ProgramArguments"][:5] == [sys.executable, "-m", "p2ptrain.cli", "daemon", "run"]
    assert "--new-swarm" in plist["ProgramArguments"]
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["Nice"] == 19 and plist["LowPriorityIO"] is True and plist["ProcessType"] == "Background"
    assert plist["ExitTimeOut"] == STOP_TIMEOUT_S
    assert path.read_bytes().startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE plist')
    assert plistlib.loads(launchd_plist([], tmp_path))["StandardErrorPath"] == str(tmp_path / "launchd.out")


def test_uninstall_removes_it_and_refuses_when_there_is_none(tmp_path):
    installed = p2ptrain("service", "install", "--new-swarm", "--home", str(tmp_path / "h"), env_home=tmp_path)
    removed = p2ptrain("service", "uninstall", env_home=tmp_path)
    again = p2ptrain("service", "uninstall", env_home=tmp_path)

    unit_path = tmp_path / ".config" / "systemd" / "user" / "p2ptrain.service"
    assert installed.returncode == 0 and removed.returncode == 0
    assert f"removed {unit_path}" in removed.stdout and not unit_path.exists()
    assert again.returncode == 2 and f"error: no service file at {unit_path}" in again.stderr


def test_install_without_peers_is_refused_before_writing(tmp_path):
    empty = tmp_path / "peers.txt"
    empty.write_text("# nobody\n")
    done = p2ptrain("service", "install", "--bootstrap-file", str(empty), env_home=tmp_path)
    assert done.returncode == 6 and "no initial peers" in done.stderr
    assert not (tmp_path / ".config" / "systemd").exists()
