"""Service definitions that run `p2ptrain daemon run` at login or boot: a systemd unit
(Linux) or a launchd agent plist (macOS).

The service manager stops the daemon with SIGTERM to the main process only (systemd
KillMode=mixed): the daemon then finishes or abandons the round, checkpoints, shuts its
DHT, averager and p2pd processes down itself and exits 0. Only what is left after
STOP_TIMEOUT_S is killed.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from p2ptrain.errors import UserError

UNIT_NAME = "p2ptrain.service"
LAUNCHD_LABEL = "org.p2ptrain.daemon"
STOP_TIMEOUT_S = 90  # systemd's default; a stopping node gives the averaging in flight at most 30 s
USER_ERROR_CODES = (2, 3, 4, 5)  # a bad option or config: restarting would fail the same way


def daemon_command(args: list[str]) -> list[str]:
    """The argv that runs the daemon in the foreground with this interpreter."""
    return [sys.executable, "-m", "p2ptrain.cli", "daemon", "run", *args]


def _systemd_quote(arg: str) -> str:
    """Quote one ExecStart word (systemd.syntax): specifiers and variables escaped too."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    if escaped and all(c.isalnum() or c in "-_./:=,+@" for c in escaped):
        return escaped
    return f'"{escaped}"'


def systemd_unit(args: list[str], user: bool, run_as: str | None = None, environment: dict[str, str] | None = None) -> str:
    exec_start = " ".join(_systemd_quote(a) for a in daemon_command(args))
    lines = [
        "[Unit]",
        "Description=p2ptrain volunteer node (peer-to-peer language-model training)",
    ]
    if not user:  # the user manager has no network-online.target
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += [
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={exec_start}",
        # SIGTERM to the daemon only: it stops its own DHT, averagers and p2pd in order
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
        "Restart=on-failure",
        "RestartSec=30",
        f"RestartPreventExitStatus={' '.join(str(c) for c in USER_ERROR_CODES)}",
        "Nice=19",
        "IOSchedulingClass=idle",
        "Environment=PYTHONUNBUFFERED=1",
    ]
    for key, value in sorted((environment or {}).items()):
        lines.append(f"Environment={_systemd_quote(f'{key}={value}')}")
    if run_as:
        lines.append(f"User={run_as}")
    lines += ["", "[Install]", f"WantedBy={'default.target' if user else 'multi-user.target'}", ""]
    return "\n".join(lines)


def launchd_plist(args: list[str], log_dir: Path, environment: dict[str, str] | None = None) -> bytes:
    plist = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": daemon_command(args),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restart after a crash, not after `daemon stop`
        "ProcessType": "Background",
        "Nice": 19,
        "LowPriorityIO": True,
        "LowPriorityBackgroundIO": True,
        "ExitTimeOut": STOP_TIMEOUT_S,
        "ThrottleInterval": 30,
        "StandardOutPath": str(log_dir / "launchd.out"),
        "StandardErrorPath": str(log_dir / "launchd.out"),
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1", **(environment or {})},
    }
    return plistlib.dumps(plist, fmt=plistlib.FMT_XML)


@dataclass
class ServiceFile:
    target: str  # systemd | launchd
    path: Path
    content: bytes
    enable: list[str]  # commands that enable and start it
    disable: list[str]


def service_file(target: str, user: bool, args: list[str], log_dir: Path,
                 environment: dict[str, str] | None = None) -> ServiceFile:
    if target == "systemd":
        if user:
            config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
            path = config / "systemd" / "user" / UNIT_NAME
            ctl = "systemctl --user"
            enable = [f"{ctl} daemon-reload", f"{ctl} enable --now {UNIT_NAME}",
                      f"loginctl enable-linger {shlex.quote(_login())}   # optional: keep it running after logout"]
        else:
            path = Path("/etc/systemd/system") / UNIT_NAME
            ctl = "systemctl"
            enable = [f"sudo {ctl} daemon-reload", f"sudo {ctl} enable --now {UNIT_NAME}"]
        content = systemd_unit(args, user, None if user else _login(), environment).encode()
        disable = [f"{'sudo ' if not user else ''}{ctl} disable --now {UNIT_NAME}"]
        return ServiceFile(target, path, content, enable, disable)
    if target == "launchd":
        if not user:
            raise UserError("service install --system is for systemd; on macOS use --user (a launchd agent)")
        path = Path.home() / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        domain = f"gui/{os.getuid()}"
        return ServiceFile(target, path, launchd_plist(args, log_dir, environment),
                           [f"launchctl bootstrap {domain} {shlex.quote(str(path))}"],
                           [f"launchctl bootout {domain}/{LAUNCHD_LABEL}"])
    raise UserError(f"unknown service target {target!r}: systemd or launchd")


def default_target() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


def _login() -> str:
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER", "root")
