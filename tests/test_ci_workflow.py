"""The GitHub workflow runs the README's test command on Linux and Apple silicon, and the formula on macOS."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())


def test_the_readmes_test_command_runs_on_ubuntu_and_apple_silicon():
    job = WORKFLOW["jobs"]["test"]
    assert job["strategy"]["matrix"]["os"] == ["ubuntu-latest", "macos-14"]
    assert "./scripts/test.sh" in (ROOT / "README.md").read_text()
    assert any("./scripts/test.sh" in step.get("run", "") for step in job["steps"])


def test_the_formula_is_audited_installed_tested_and_run_as_a_service_on_macos():
    job = WORKFLOW["jobs"]["homebrew"]
    assert job["runs-on"] == "macos-14"
    script = "\n".join(step.get("run", "") for step in job["steps"])
    for command in ("brew audit --strict --formula", "brew install --build-from-source", "brew test",
                    "brew services start", "brew services stop", "/v1/chat/completions"):
        assert command in script, command
