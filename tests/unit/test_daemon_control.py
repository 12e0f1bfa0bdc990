"""The local control channel: private to this user, one JSON request and response per
connection, a unix socket (or 127.0.0.1 with a token where sockets are missing)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from p2ptrain.daemon import control


def echo_handler(request: dict) -> dict:
    if request.get("cmd") == "boom":
        raise RuntimeError("handler failed")
    return {"ok": True, "echo": request.get("cmd")}


@pytest.fixture
def server(tmp_path):
    s = control.ControlServer(tmp_path / "run", echo_handler, transport="unix").start()
    yield s
    s.close()


def test_request_and_response_over_a_private_unix_socket(tmp_path, server):
    reply = control.request(tmp_path / "run", {"cmd": "status"})

    assert reply == {"ok": True, "echo": "status"}
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o700
    sock = tmp_path / "run" / "control.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600


def test_a_failing_handler_or_garbage_gets_an_error_not_a_dead_server(tmp_path, server):
    boom = control.request(tmp_path / "run", {"cmd": "boom"})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(str(tmp_path / "run" / "control.sock"))
        raw.sendall(b"not json\n")
        garbage = json.loads(raw.makefile().readline())

    assert boom == {"ok": False, "error": "RuntimeError: handler failed"}
    assert garbage["ok"] is False and "JSON object" in garbage["error"]
    assert control.request(tmp_path / "run", {"cmd": "after"}) == {"ok": True, "echo": "after"}


def test_nothing_listening_is_not_running(tmp_path):
    with pytest.raises(control.NotRunning):
        control.request(tmp_path / "run", {"cmd": "status"})
    # a socket file left by a killed node
    (tmp_path / "run").mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "run" / "control.sock"))
    dead.close()
    with pytest.raises(control.NotRunning):
        control.request(tmp_path / "run", {"cmd": "status"})


def test_a_path_too_long_for_sun_path_still_works(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "run"
    assert len(str(deep / "control.sock")) > 108
    s = control.ControlServer(deep, echo_handler, transport="unix").start()
    try:
        assert control.request(deep, {"cmd": "deep"}) == {"ok": True, "echo": "deep"}
    finally:
        s.close()
    assert not (deep / "control.sock").exists()


def test_tcp_fallback_needs_the_token_from_a_private_file(tmp_path):
    s = control.ControlServer(tmp_path / "run", echo_handler, transport="tcp").start()
    try:
        info_file = tmp_path / "run" / "control.json"
        info = json.loads(info_file.read_text())
        with socket.create_connection(("127.0.0.1", info["port"]), timeout=5) as raw:
            raw.sendall(b'{"cmd": "status", "token": "guess"}\n')
            refused = json.loads(raw.makefile().readline())
        reply = control.request(tmp_path / "run", {"cmd": "status"})
        listening = s._sock.getsockname()
    finally:
        s.close()

    assert refused == {"ok": False, "error": "bad or missing token"}
    assert reply == {"ok": True, "echo": "status"}
    assert listening[0] == "127.0.0.1"
    assert not info_file.exists()


def test_the_token_file_is_private(tmp_path):
    s = control.ControlServer(tmp_path / "run", echo_handler, transport="tcp").start()
    try:
        mode = stat.S_IMODE((tmp_path / "run" / "control.json").stat().st_mode)
    finally:
        s.close()
    assert mode == 0o600


def test_another_user_is_refused():
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    # Prepare: a directory the other user can reach, and the socket opened to everyone, so only the
    # server's uid check (SO_PEERCRED) is left to refuse
    base = Path(tempfile.mkdtemp(prefix="p2ptrain-ctl-", dir="/tmp"))
    server = control.ControlServer(base / "run", echo_handler, transport="unix").start()
    try:
        os.chmod(base, 0o755)
        os.chmod(base / "run", 0o755)
        os.chmod(base / "run" / "control.sock", 0o777)
        pid = os.fork()
        if pid == 0:  # the child becomes nobody and asks
            code = 1
            try:
                os.setuid(65534)
                try:
                    reply = control.request(base / "run", {"cmd": "status"}, timeout=5)
                    code = 3 if reply.get("ok") else 4
                except control.NotRunning:
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        mine = control.request(base / "run", {"cmd": "status"})
    finally:
        server.close()
        shutil.rmtree(base)

    # Assert: the server closed the other user's connection without answering, and still serves us
    assert os.WEXITSTATUS(status) == 0
    assert mine == {"ok": True, "echo": "status"}
