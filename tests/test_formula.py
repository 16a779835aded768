"""The Homebrew formula is what its generator renders from the lock, and it is valid Ruby."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORMULA = ROOT / "Formula" / "mlxserve.rb"


def test_the_formula_is_regenerated_exactly_from_the_lock():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_formula.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_locked_dependency_is_a_pinned_resource_with_its_sha256():
    locked = json.loads((ROOT / "Formula" / "resources.lock.json").read_text())
    text = FORMULA.read_text()
    names = {r["name"].lower().replace("_", "-") for r in locked["resources"]}
    assert {"mlx", "mlx-metal", "mlx-lm", "mlx-vlm", "sanic", "numpy"} <= names
    for r in locked["resources"]:
        using = "" if r["url"].endswith("-none-any.whl") else ", using: :nounzip"
        assert f'url "{r["url"]}"{using}\n    sha256 "{r["sha256"]}"' in text
        assert len(r["sha256"]) == 64 and r["version"] in r["url"]
    for line in ("include Language::Python::Virtualenv", "depends_on arch: :arm64", "service do",
                 "keep_alive true", 'log_path var/"log/mlxserve.log"', "def caveats", "test do"):
        assert line in text


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby is not installed (.ci/run installs it)")
def test_the_formula_is_valid_ruby():
    result = subprocess.run(["ruby", "-c", str(FORMULA)], capture_output=True, text=True)
    assert result.returncode == 0 and "Syntax OK" in result.stdout, result.stderr


def test_post_install_makes_the_folders_the_service_runs_in():
    """launchd does not start a job whose working directory is missing, and does not create log folders."""
    formula = (ROOT / "Formula" / "mlxserve.rb").read_text()
    post_install = formula[formula.index("def post_install"):formula.index("service do")]
    service = formula[formula.index("service do"):formula.index("def caveats")]
    assert 'working_dir var/"mlxserve"' in service and '(var/"mlxserve").mkpath' in post_install
    assert 'var/"log/' in service and '(var/"log").mkpath' in post_install


def test_dependencies_install_the_homebrew_way_without_pip_in_the_virtualenv():
    """Homebrew's virtualenv has no pip: resources go through virtualenv_install_with_resources (the brewed
    Python's pip from outside), platform wheels by path since Homebrew would unpack them."""
    formula = FORMULA.read_text()
    install = formula[formula.index("  def install"):formula.index("  def post_install")]
    assert "virtualenv_install_with_resources(without: platform_wheels.map(&:name))" in install
    assert "venv.pip_install Pathname.pwd/File.basename(r.url)" in install
    assert '"-m", "pip"' not in install and "virtualenv_create" not in install
    assert formula.count("using: :nounzip") == sum(
        not r["url"].endswith("-none-any.whl")
        for r in json.loads((ROOT / "Formula" / "resources.lock.json").read_text())["resources"])


def test_brew_test_answers_a_chat_completion_from_the_bundled_tiny_model(tmp_path: Path):
    formula = FORMULA.read_text()
    test = formula[formula.index("  test do"):]
    assert '"import", pkgshare/"tiny-chat.gguf"' in test and "--no-preload" not in test
    assert "/v1/chat/completions" in test and 'assert_match "\\"object\\":\\"chat.completion\\""' in test
    assert 'pkgshare.install "Formula/tiny-chat.gguf"' in formula
    from mlxserve.engine.gguf import convert_gguf

    model = convert_gguf(ROOT / "Formula" / "tiny-chat.gguf", tmp_path / "tiny-chat")
    assert "<|im_start|>" in json.loads((model / "tokenizer_config.json").read_text())["chat_template"]
