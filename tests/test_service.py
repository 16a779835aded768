"""`mlxserve service install | uninstall` writes a valid plist or unit, and uninstall removes it all."""

from __future__ import annotations

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
                                             ("linux", "systemctl --user enable --now mlxserve.service")])
def test_dry_run_prints_and_writes_nothing(tmp_path: Path, platform: str, marker: str):
    out = _run(tmp_path, "install", "--platform", platform, "--dry-run").stdout
    assert "would write" in out and marker in out
    assert not (tmp_path / "user").exists() and not (tmp_path / "mlxserve-home").exists()
    assert "would run" in _run(tmp_path, "uninstall", "--platform", platform, "--dry-run").stdout
