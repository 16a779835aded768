"""`mlxserve service ...`: run the server under launchd (macOS) or systemd --user (Linux).

For users who installed with pip (Homebrew users have `brew services`). Installing writes one
file, a LaunchAgent plist or a user unit with absolute paths, and asks the service manager to
start it at login and keep it alive; uninstalling stops it and removes that file.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

LABEL = "com.mlxserve.server"
UNIT = "mlxserve.service"
PLATFORMS = ("macos", "linux")


def current_platform() -> str:
    return "macos" if sys.platform == "darwin" else "linux"


@dataclass
class Plan:
    """What a service command writes, removes and runs; `--dry-run` prints it instead."""

    platform: str
    path: Path  # the plist or unit file
    content: bytes = b""
    start: list[list[str]] = field(default_factory=list)  # run after writing
    stop: list[list[str]] = field(default_factory=list)  # run before removing
    status: list[str] = field(default_factory=list)


def _program(home: Path, config: Path | None) -> list[str]:
    args = [sys.executable, "-m", "mlxserve", "serve", "--home", str(home)]
    return args + (["--config", str(config)] if config else [])


def launchd_plist(home: Path, config: Path | None) -> bytes:
    logs = home / "logs"
    return plistlib.dumps({
        "Label": LABEL,
        "ProgramArguments": _program(home, config),
        "RunAtLoad": True,
        "KeepAlive": True,
        "WorkingDirectory": str(home),
        "EnvironmentVariables": {"MLXSERVE_HOME": str(home), "PYTHONUNBUFFERED": "1"},
        "StandardOutPath": str(logs / "service.out.log"),
        "StandardErrorPath": str(logs / "service.err.log"),
        # Interactive: not throttled like a background daemon, so the GPU runs at full speed.
        "ProcessType": "Interactive",
    })


def systemd_unit(home: Path, config: Path | None) -> bytes:
    logs = home / "logs"
    return f"""[Unit]
Description=mlxserve: local OpenAI-compatible LLM server
After=network.target

[Service]
Type=simple
ExecStart={shlex.join(_program(home, config))}
WorkingDirectory={home}
Environment=MLXSERVE_HOME={home}
Environment=PYTHONUNBUFFERED=1
Restart=always
RestartSec=5
StandardOutput=append:{logs / "service.out.log"}
StandardError=append:{logs / "service.err.log"}

[Install]
WantedBy=default.target
""".encode()


def plan(platform: str, home: Path, config: Path | None = None) -> Plan:
    if platform == "macos":
        path = Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        domain = f"gui/{os.getuid()}"
        return Plan(platform, path, launchd_plist(home, config),
                    start=[["launchctl", "bootstrap", domain, str(path)]],
                    stop=[["launchctl", "bootout", f"{domain}/{LABEL}"]],
                    status=["launchctl", "print", f"{domain}/{LABEL}"])
    path = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user" / UNIT
    return Plan(platform, path, systemd_unit(home, config),
                start=[["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", UNIT]],
                stop=[["systemctl", "--user", "disable", "--now", UNIT]],
                status=["systemctl", "--user", "status", "--no-pager", UNIT])


def _run(command: list[str]) -> str | None:
    """Run a service-manager command; the reason it failed, or None."""
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        return f"{command[0]} is not installed"
    if result.returncode != 0:
        return (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
    return None


def install(p: Plan, home: Path, start: bool = True) -> list[str]:
    """Write the file (and the log folder it names), then start it; returns warnings."""
    (home / "logs").mkdir(parents=True, exist_ok=True)
    p.path.parent.mkdir(parents=True, exist_ok=True)
    p.path.write_bytes(p.content)
    if not start:
        return []
    return [f"`{shlex.join(c)}` failed: {reason}" for c in p.start if (reason := _run(c))]


def uninstall(p: Plan, home: Path) -> list[str]:
    """Stop the service (a stop that fails because it is not running is fine), then remove the file."""
    warnings = [f"`{shlex.join(c)}` failed: {reason}" for c in p.stop if (reason := _run(c))]
    p.path.unlink(missing_ok=True)
    logs = home / "logs"
    if logs.is_dir() and not any(logs.iterdir()):  # made by install, never used
        logs.rmdir()
    if p.platform == "linux":
        _run(["systemctl", "--user", "daemon-reload"])
    return warnings


def describe(p: Plan, action: str) -> str:
    """What `action` would do, for --dry-run."""
    if action == "install":
        lines = [f"would write {p.path}:", p.content.decode(), "then run:"]
        lines += [f"  {shlex.join(c)}" for c in p.start]
    else:
        lines = ["would run:", *[f"  {shlex.join(c)}" for c in p.stop], f"then remove {p.path}"]
    return "\n".join(lines)
