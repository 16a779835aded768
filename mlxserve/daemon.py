"""`mlxserve server start | stop | status`: the server as a background process.

For users without launchd or systemd: the server runs detached from the
terminal, its output goes to `HOME/logs/server.log`, and `HOME/server.json`
records its pid and address so that stop, status and the other commands find it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlxserve.client import AdminClient, ClientError


def base_url(host: str, port: int) -> str:
    """Where a client reaches a server bound to `host`: a wildcard bind is reached on loopback."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


@dataclass
class ServerRecord:
    pid: int
    host: str
    port: int
    log: str

    @property
    def url(self) -> str:
        return base_url(self.host, self.port)


def record_path(home: Path) -> Path:
    return home / "server.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running(home: Path) -> ServerRecord | None:
    """The background server this home started, if it is still running (a stale record is removed)."""
    path = record_path(home)
    try:
        record = ServerRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if _alive(record.pid):
        return record
    path.unlink(missing_ok=True)
    return None


def start(home: Path, host: str, port: int, serve_args: list[str], wait: float = 600) -> ServerRecord:
    """Start `mlxserve serve serve_args` in the background; return once it answers (or raise)."""
    existing = running(home)
    if existing:
        raise ClientError(f"a server is already running (pid {existing.pid}, {existing.url})")
    log = home / "logs" / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlxserve", "serve", "--home", str(home), *serve_args],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    record = ServerRecord(process.pid, host, port, str(log))
    record_path(home).write_text(json.dumps(asdict(record)))
    client = AdminClient(record.url, timeout=5)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if process.poll() is not None:
            record_path(home).unlink(missing_ok=True)
            raise ClientError(f"the server exited with status {process.returncode}; see {log}:\n"
                              + _tail(log))
        try:
            if client.get("/health")["pid"] == process.pid:  # open even when an API key is set
                return record
        except (ClientError, KeyError, TypeError):
            pass
        time.sleep(0.25)
    raise ClientError(f"the server (pid {process.pid}) did not answer within {wait:.0f}s; see {log}")


def _is_mlxserve(record: ServerRecord) -> bool:
    """Whether the recorded pid is still that server, not another program that got the pid since."""
    try:
        if AdminClient(record.url, timeout=5).get("/health")["pid"] == record.pid:
            return True
    except (ClientError, KeyError, TypeError):
        pass  # a wedged server does not answer: look at its command line
    try:
        command = subprocess.run(["ps", "-o", "command=", "-p", str(record.pid)], capture_output=True,
                                 text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "mlxserve" in command and " serve" in command


def stop(home: Path, wait: float = 30) -> ServerRecord | None:
    """Stop the background server (SIGTERM, then SIGKILL after `wait`); None if none was running."""
    record = running(home)
    if record is None:
        return None
    if not _is_mlxserve(record):  # the server died and its pid went to another program: leave that alone
        record_path(home).unlink(missing_ok=True)
        return None
    os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while _alive(record.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(record.pid):
        os.kill(record.pid, signal.SIGKILL)
    record_path(home).unlink(missing_ok=True)
    return record


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
