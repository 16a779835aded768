"""`mlxserve service install | uninstall` writes a valid plist or unit, and uninstall removes it all."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import mlxserve


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _run(tmp_path: Path, *args: str, check: bool = True):
    home = tmp_path / "mlxserve-home"
    return mlxserve(home, "service", *args, env={"HOME": str(tmp_path / "user"), "XDG_CONFIG_HOME": ""},
                    check=check)


def test_launchd_plist_has_absolute_paths_and_keeps_the_server_alive(tmp_path: Path):
    before = _files(tmp_path)
    out = _run(tmp_path, "install", "--platform", "macos", "--no-start").stdout
    path = tmp_path / "user" / "Library" / "LaunchAgents" / "com.mlxserve.server.plist"
    assert str(path) in out
    plist = plistlib.loads(path.read_bytes())
    home = str(tmp_path / "mlxserve-home")
    assert plist["Label"] == "com.mlxserve.server" and plist["RunAtLoad"] and plist["KeepAlive"]
    assert plist["ProgramArguments"][:4] == [sys.executable, "-m", "mlxserve", "serve"]
    assert plist["ProgramArguments"][4:] == ["--home", home]
    assert all(Path(p).is_absolute() for p in (plist["StandardOutPath"], plist["StandardErrorPath"],
                                               plist["WorkingDirectory"], plist["ProgramArguments"][0]))
    assert plist["EnvironmentVariables"]["MLXSERVE_HOME"] == home
    assert Path(plist["StandardErrorPath"]).parent.is_dir()  # launchd does not create it
    result = _run(tmp_path, "uninstall", "--platform", "macos")
    assert "Removed" in result.stdout
    assert {p for p in _files(tmp_path) - before if p.is_file()} == set()
    assert not path.exists() and not (tmp_path / "mlxserve-home" / "logs").exists()


def test_systemd_unit_verifies_and_uninstall_removes_it(tmp_path: Path):
    _run(tmp_path, "install", "--platform", "linux", "--no-start")
    unit = tmp_path / "user" / ".config" / "systemd" / "user" / "mlxserve.service"
    text = unit.read_text()
    assert f"ExecStart={sys.executable} -m mlxserve serve --home {tmp_path / 'mlxserve-home'}" in text
    assert "Restart=always" in text and "WantedBy=default.target" in text
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert check.returncode == 0 and check.stderr.strip() == "", check.stderr
    _run(tmp_path, "uninstall", "--platform", "linux")
    assert not unit.exists()
    assert not [p for p in (tmp_path / "user").rglob("*") if p.is_file()]


@pytest.mark.parametrize("platform,marker", [("macos", "launchctl bootstrap gui/"),
                                             ("linux", "systemctl --user restart mlxserve.service")])
def test_dry_run_prints_and_writes_nothing(tmp_path: Path, platform: str, marker: str):
    out = _run(tmp_path, "install", "--platform", platform, "--dry-run").stdout
    assert "would write" in out and marker in out
    assert not (tmp_path / "user").exists() and not (tmp_path / "mlxserve-home").exists()
    assert "would run" in _run(tmp_path, "uninstall", "--platform", platform, "--dry-run").stdout


def _fake_manager(tmp_path: Path, name: str, script: str) -> dict[str, str]:
    """A fake `launchctl`/`systemctl` on PATH that records each call and answers as `script` says."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\n{script}\n")
    tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls").read_text().splitlines()


def test_installing_over_a_loaded_agent_boots_it_out_first(tmp_path: Path):
    # launchctl as it behaves with the agent loaded: bootout succeeds, bootstrap only after it.
    env = _fake_manager(tmp_path, "launchctl", 'case "$1" in bootstrap) exit 0;; bootout) exit 0;; esac')
    for _ in range(2):
        result = mlxserve(tmp_path / "home", "service", "install", "--platform", "macos",
                          env={"HOME": str(tmp_path / "user"), **env})
        assert "warning" not in result.stderr
    calls = _calls(tmp_path)
    assert [c.split()[0] for c in calls] == ["bootout", "bootstrap", "bootout", "bootstrap"]


def test_a_first_install_ignores_bootout_failing(tmp_path: Path):
    env = _fake_manager(tmp_path, "launchctl", '[ "$1" = bootout ] && { echo "No such process" >&2; exit 3; }; exit 0')
    result = mlxserve(tmp_path / "home", "service", "install", "--platform", "macos",
                      env={"HOME": str(tmp_path / "user"), **env})
    assert "warning" not in result.stderr and _calls(tmp_path)[-1].startswith("bootstrap")


@pytest.mark.parametrize("platform, tool, answer, expected", [
    ("macos", "launchctl", 'printf "\\tstate = running\\n\\tpid = 4242\\n\\tlast exit code = 0\\n"',
     "service: loaded: yes; running: yes, pid 4242; last exit: 0"),
    ("macos", "launchctl", 'echo "Could not find service" >&2; exit 113',
     "service: loaded: no"),
    ("linux", "systemctl", 'printf "LoadState=loaded\\nUnitFileState=enabled\\nActiveState=failed\\n'
                           'SubState=failed\\nMainPID=0\\nExecMainStatus=1\\n"',
     "service: loaded: yes (enabled at login); running: no (failed); last exit: 1"),
])
def test_status_says_loaded_running_and_last_exit(tmp_path: Path, platform, tool, answer, expected):
    user = {"HOME": str(tmp_path / "user"), "XDG_CONFIG_HOME": ""}
    mlxserve(tmp_path / "home", "service", "install", "--platform", platform, "--no-start", env=user)
    env = {**user, **_fake_manager(tmp_path, tool, answer), "MLXSERVE_PORT": "9"}
    out = mlxserve(tmp_path / "home", "service", "status", "--platform", platform, env=env).stdout
    assert expected in out


def test_a_homebrew_interpreter_is_written_as_its_opt_path(tmp_path: Path):
    from mlxserve.service import stable_executable

    prefix = tmp_path / "homebrew"
    cellar = prefix / "Cellar" / "mlxserve" / "0.1.0" / "libexec" / "bin" / "python"
    opt = prefix / "opt" / "mlxserve" / "libexec" / "bin" / "python"
    for path in (cellar, opt):
        path.parent.mkdir(parents=True)
        path.touch()
    assert stable_executable(str(cellar)) == str(opt)
    assert stable_executable("/usr/bin/python3") == "/usr/bin/python3"
    (opt).unlink()
    assert stable_executable(str(cellar)) == str(cellar)  # no opt link: the only path there is
