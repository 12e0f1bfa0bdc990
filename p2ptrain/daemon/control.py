"""The local control channel: `p2ptrain status`, `daemon mode`, `daemon stop` talk to a
running node (the daemon or a foreground `join`) over it.

One JSON object per line: the client sends a request, the node answers one response and
closes. A unix socket `control.sock` in the runtime directory (mode 0700), the socket
itself mode 0600, and on Linux the caller's uid is checked (SO_PEERCRED): never reachable
from another machine or another local user. Where unix sockets are missing it listens on
127.0.0.1 and writes the port and a random token to `control.json` (mode 0600); a request
without the token is refused.

Requests: {"cmd": "status"} · {"cmd": "mode", "mode": "never", "for_s": 7200} ·
{"cmd": "stop"} · {"cmd": "reload"} (preferences). Responses: {"ok": true, ...} or
{"ok": false, "error": "..."}.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import socket
import struct
import sys
import threading
from pathlib import Path
from typing import Callable

from p2ptrain.daemon import lifeline
from p2ptrain.home import private_dir, write_private

logger = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
TCP_FILE = "control.json"
MAX_MESSAGE = 1 << 20
CLIENT_TIMEOUT_S = 10.0
UNIX_PATH_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS


class NotRunning(Exception):
    """Nothing answers on this home's control channel."""


def _short_unix_path(path: Path) -> tuple[str, int | None]:
    """A path short enough for sun_path. A long one (deep test directories) is reached
    through /proc/self/fd/N of its directory on Linux; returns (path, fd to close)."""
    if len(str(path)) < UNIX_PATH_MAX:
        return str(path), None
    if not Path("/proc/self/fd").is_dir():
        raise OSError(f"control socket path too long for this system: {path}")
    fd = os.open(path.parent, os.O_RDONLY)
    return f"/proc/self/fd/{fd}/{path.name}", fd


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise ValueError("message too large")
    return data.split(b"\n", 1)[0]


class ControlServer:
    """Answers control requests in a background thread with `handler(request) -> response`."""

    def __init__(self, runtime_dir: Path, handler: Callable[[dict], dict], transport: str | None = None):
        self.runtime_dir = runtime_dir
        self.handler = handler
        self.transport = transport or ("unix" if hasattr(socket, "AF_UNIX") else "tcp")
        self.address = ""
        self._sock: socket.socket | None = None
        self._token = ""
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def start(self) -> "ControlServer":
        private_dir(self.runtime_dir)
        if self.transport == "unix":
            path = self.runtime_dir / SOCKET_NAME
            path.unlink(missing_ok=True)  # the caller holds the instance lock: a socket file here is stale
            (self.runtime_dir / TCP_FILE).unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            bind_path, fd = _short_unix_path(path)
            old_umask = os.umask(0o177)
            try:
                sock.bind(bind_path)
            finally:
                os.umask(old_umask)
                if fd is not None:
                    os.close(fd)
            os.chmod(path, 0o600)
            self.address = str(path)
        else:
            (self.runtime_dir / SOCKET_NAME).unlink(missing_ok=True)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            self._token = secrets.token_hex(16)
            port = sock.getsockname()[1]
            write_private(self.runtime_dir / TCP_FILE, json.dumps({"port": port, "token": self._token,
                                                                   "pid": os.getpid()}))
            self.address = f"127.0.0.1:{port}"
        sock.listen(8)
        sock.settimeout(1.0)
        self._sock = sock
        lifeline.close_in_children(sock.fileno())
        self._thread = threading.Thread(target=self._serve, name="p2ptrain-control", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                raise
            with conn:
                try:
                    conn.settimeout(5.0)
                    self._answer(conn)
                except (OSError, ValueError) as e:
                    logger.debug("control request failed: %s", e)

    def _answer(self, conn: socket.socket) -> None:
        if self.transport == "unix" and hasattr(socket, "SO_PEERCRED"):
            _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                  struct.calcsize("3i")))
            if uid not in (os.getuid(), 0):
                logger.warning("refused a control request from uid %d", uid)
                return
        try:
            request = json.loads(_read_line(conn) or b"null")
        except ValueError:
            request = None
        if not isinstance(request, dict):
            response = {"ok": False, "error": "a request is one JSON object per line"}
        elif self.transport == "tcp" and not hmac.compare_digest(str(request.get("token", "")), self._token):
            response = {"ok": False, "error": "bad or missing token"}
        else:
            try:
                response = self.handler(request)
            except Exception as e:  # a bad request must not take the node down
                logger.exception("control request %r failed", request.get("cmd"))
                response = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        conn.sendall(json.dumps(response, allow_nan=False, default=str).encode() + b"\n")

    def close(self) -> None:
        self._closed.set()
        if self._sock is not None:
            lifeline.forget_fd(self._sock.fileno())
            with contextlib.suppress(OSError):
                self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for name in (SOCKET_NAME, TCP_FILE):
            with contextlib.suppress(OSError):
                (self.runtime_dir / name).unlink()


def request(runtime_dir: Path, message: dict, timeout: float = CLIENT_TIMEOUT_S) -> dict:
    """Send one request to the node of this home; NotRunning when nothing answers."""
    unix_path, tcp_file = runtime_dir / SOCKET_NAME, runtime_dir / TCP_FILE
    if unix_path.exists() and hasattr(socket, "AF_UNIX"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        fd = None
        try:
            connect_path, fd = _short_unix_path(unix_path)
            sock.connect(connect_path)
        except OSError as e:
            sock.close()
            raise NotRunning(f"nothing answers on {unix_path} ({e.strerror or e})") from None
        finally:
            if fd is not None:
                os.close(fd)
    elif tcp_file.exists():
        try:
            info = json.loads(tcp_file.read_text())
            message = {**message, "token": info["token"]}
            sock = socket.create_connection(("127.0.0.1", int(info["port"])), timeout=timeout)
        except (OSError, ValueError, KeyError) as e:
            raise NotRunning(f"nothing answers at {tcp_file} ({e})") from None
    else:
        raise NotRunning(f"no control socket in {runtime_dir}")
    with sock:
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
            line = _read_line(sock)
        except OSError as e:
            raise NotRunning(f"the node did not answer ({e})") from None
    if not line:
        raise NotRunning("the node closed the connection without answering")
    return json.loads(line)


def platform_transport() -> str:
    return "unix" if hasattr(socket, "AF_UNIX") and sys.platform != "win32" else "tcp"
