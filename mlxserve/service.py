"""`mlxserve service ...`: run the server under launchd (macOS) or systemd --user (Linux).

For users who installed with pip (Homebrew users have `brew services`). Installing writes one
file, a LaunchAgent plist or a user unit with absolute paths, and asks the service manager to
start it at login and keep it alive; uninstalling stops it and removes that file.
"""

from __future__ import annotations

import os
import plistlib
import re
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
    # Run after writing: first `replace` (stops a copy already loaded; failing because none is, is fine),
    # then `start`.
    replace: list[list[str]] = field(default_factory=list)
    start: list[list[str]] = field(default_factory=list)
    stop: list[list[str]] = field(default_factory=list)  # run before removing
    status: list[str] = field(default_factory=list)


_CELLAR = re.compile(r"^(?P<prefix>.*)/Cellar/(?P<formula>[^/]+)/[^/]+/(?P<rest>.+)$")


def stable_executable(executable: str) -> str:
    """The interpreter as a path that outlives upgrades: under Homebrew, its `opt` link instead of the
    versioned Cellar folder, which `brew upgrade` deletes (when the `opt` path exists)."""
    match = _CELLAR.match(executable)
    if match is None:
        return executable
    stable = f"{match['prefix']}/opt/{match['formula']}/{match['rest']}"
    return stable if os.path.exists(stable) else executable


def _program(home: Path, config: Path | None) -> list[str]:
    args = [stable_executable(sys.executable), "-m", "mlxserve", "serve", "--home", str(home)]
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
        # `bootstrap` fails while the agent is loaded: a second install boots the old one out first.
        return Plan(platform, path, launchd_plist(home, config),
                    replace=[["launchctl", "bootout", f"{domain}/{LABEL}"]],
                    start=[["launchctl", "bootstrap", domain, str(path)]],
                    stop=[["launchctl", "bootout", f"{domain}/{LABEL}"]],
                    status=["launchctl", "print", f"{domain}/{LABEL}"])
    path = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user" / UNIT
    # `restart`: a unit already running picks up the file just written.
    return Plan(platform, path, systemd_unit(home, config),
                start=[["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", UNIT],
                       ["systemctl", "--user", "restart", UNIT]],
                stop=[["systemctl", "--user", "disable", "--now", UNIT]],
                status=["systemctl", "--user", "show", UNIT,
                        "--property=LoadState,UnitFileState,ActiveState,SubState,MainPID,ExecMainStatus"])


def status_summary(platform: str, returncode: int, output: str) -> str:
    """`launchctl print` or `systemctl show` as one line: loaded, running (with its pid), last exit status."""
    if platform == "macos":
        if returncode != 0:
            return "loaded: no (launchd does not know the agent; `mlxserve service install` loads it)"
        fields = dict(re.findall(r"^\s*(state|pid|last exit code) = (.+)$", output, re.MULTILINE))
        running = fields.get("state") == "running"
        return (f"loaded: yes; running: {'yes, pid ' + fields.get('pid', '?') if running else 'no'}; "
                f"last exit: {fields.get('last exit code', 'none yet')}")
    fields = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    if returncode != 0 or fields.get("LoadState") != "loaded":
        return "loaded: no (systemd does not know the unit; `mlxserve service install` loads it)"
    running = fields.get("ActiveState") == "active"
    return (f"loaded: yes ({fields.get('UnitFileState', '?')} at login); running: "
            f"{'yes, pid ' + fields.get('MainPID', '?') if running else 'no (' + fields.get('SubState', '?') + ')'}; "
            f"last exit: {fields.get('ExecMainStatus', 'none yet')}")


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
    for command in p.replace:
        _run(command)
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
        lines += [f"  {shlex.join(c)}  (a failure is fine: none was loaded)" for c in p.replace]
        lines += [f"  {shlex.join(c)}" for c in p.start]
    else:
        lines = ["would run:", *[f"  {shlex.join(c)}" for c in p.stop], f"then remove {p.path}"]
    return "\n".join(lines)
