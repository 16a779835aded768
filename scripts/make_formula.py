"""Generate Formula/mlxserve.rb, the Homebrew formula, from the lock of its Python dependencies.

Two steps, so that the formula is never written by hand:

    python scripts/make_formula.py --lock    # resolve for macOS arm64 with uv, pin every package and
                                             # the wheel (or sdist) it installs, with its sha256,
                                             # into Formula/resources.lock.json (needs uv and PyPI)
    python scripts/make_formula.py           # render Formula/mlxserve.rb from the lock (offline)
    python scripts/make_formula.py --check   # exit 1 if the formula is not what the lock renders

Every dependency is a pinned `resource` with its sha256. MLX publishes wheels only (no sdist),
so resources are the wheels for macOS 14+ on arm64 and CPython 3.12 where a package has them;
the formula installs them with pip, offline, into its virtualenv. Until the first release
tarball exists (`--release URL SHA256` records it in the lock), the formula builds from the
main branch (`brew install --HEAD`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "Formula" / "resources.lock.json"
FORMULA = ROOT / "Formula" / "mlxserve.rb"
TEST_MODEL = ROOT / "Formula" / "tiny-chat.gguf"
PYTHON = "3.12"
MACOS = "14.0"
HOMEPAGE = "https://github.com/mlxserve/mlxserve"

# Wheel platform tags a macOS 14 arm64 CPython 3.12 installs, best first.
_PLATFORMS = [f"macosx_{v}_arm64" for v in ("14_0", "13_0", "12_0", "11_0")] + \
             [f"macosx_{v}_universal2" for v in ("14_0", "13_0", "12_0", "11_0", "10_9")] + \
             [f"macosx_10_{m}_universal2" for m in range(15, 8, -1)]
_ABIS = ["cp312-cp312", "cp312-abi3", "cp311-abi3", "cp310-abi3", "cp39-abi3", "cp38-abi3", "cp37-abi3",
         "py3-none"]


def _rank(filename: str) -> tuple[int, int] | None:
    """How well a wheel fits macOS arm64 CPython 3.12 (lower is better); None if it does not."""
    if filename.endswith("-py3-none-any.whl") or filename.endswith("-py2.py3-none-any.whl"):
        return (len(_ABIS), 0)
    pure = re.search(r"-py3(\d+)-none-any\.whl$", filename)  # e.g. multiprocess's py312 wheels
    if pure:
        return (len(_ABIS), 0) if int(pure.group(1)) == int(PYTHON.split(".")[1]) else None
    for a, abi in enumerate(_ABIS):
        for p, platform in enumerate(_PLATFORMS):
            if filename.endswith(f"-{abi}-{platform}.whl"):
                return (a, p)
    return None


def _pick(name: str, version: str) -> dict[str, str]:
    """The best file of `name==version` for macOS arm64, from PyPI's JSON simple index (PEP 691)."""
    request = urllib.request.Request(f"https://pypi.org/simple/{_resource_name(name)}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    stem = re.sub(r"[-_.]+", "_", name).lower() + "-" + version
    files = [f for f in files if re.sub(r"[-_.]+", "_", f["filename"].split("-")[0]).lower() + "-" +
             f["filename"].split("-")[1].removesuffix(".tar.gz").removesuffix(".zip") == stem]
    wheels = sorted(((_rank(f["filename"]), f) for f in files if f["filename"].endswith(".whl")
                     and _rank(f["filename"]) is not None), key=lambda pair: pair[0])
    chosen = wheels[0][1] if wheels else next((f for f in files if f["filename"].endswith((".tar.gz", ".zip"))),
                                              None)
    if chosen is None:
        raise SystemExit(f"{name}=={version} has no file for macOS arm64 / CPython {PYTHON}")
    return {"name": name, "version": version, "url": chosen["url"], "sha256": chosen["hashes"]["sha256"]}


def lock(previous: dict) -> dict:
    """Resolve pyproject.toml's dependencies for macOS arm64 and pin each file."""
    with tempfile.TemporaryDirectory() as tmp:
        pins = Path(tmp) / "pins.txt"
        subprocess.run(["uv", "pip", "compile", str(ROOT / "pyproject.toml"), "--python-platform",
                        "aarch64-apple-darwin", "--python-version", PYTHON, "--index-url", "https://pypi.org/simple",
                        "--no-header", "--no-annotate", "-q", "-o", str(pins)],
                       check=True, env={**os.environ, "MACOSX_DEPLOYMENT_TARGET": MACOS, "PIP_CONFIG_FILE": os.devnull})
        requirements = [line.split("==") for line in pins.read_text().split() if "==" in line]
    resources = []
    for i, (name, version) in enumerate(requirements, start=1):
        print(f"[{i}/{len(requirements)}] {name}=={version}", file=sys.stderr)
        resources.append(_pick(name, version))
    return {"python": PYTHON, "macos": MACOS, "source": previous.get("source"), "resources": resources}


def _is_platform_wheel(url: str) -> bool:
    return url.endswith(".whl") and not url.endswith("-none-any.whl")


def _resource_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def render(locked: dict) -> str:
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    source = locked.get("source")
    lines = [
        "# Generated by scripts/make_formula.py from Formula/resources.lock.json; do not edit by hand.",
        "class Mlxserve < Formula",
        "  include Language::Python::Virtualenv",
        "",
        '  desc "Local OpenAI-compatible LLM server on MLX for Apple silicon"',
        f'  homepage "{HOMEPAGE}"',
    ]
    if source:  # a release; without one the formula is HEAD-only (`brew install --HEAD`)
        lines += [f'  url "{source["url"]}"', f'  sha256 "{source["sha256"]}"', f'  version "{version}"']
    lines += [
        '  license "MIT"',
        f'  head "{HOMEPAGE}.git", branch: "main"',
        "",
        "  depends_on arch: :arm64",
        "  depends_on macos: :sonoma",
        f'  depends_on "python@{locked["python"]}"',
        "",
    ]
    for r in locked["resources"]:
        # A platform wheel is fetched as the file it is: Homebrew would unpack it, and pip installs only the file.
        using = ", using: :nounzip" if _is_platform_wheel(r["url"]) else ""
        lines += [f'  resource "{_resource_name(r["name"])}" do', f'    url "{r["url"]}"{using}',
                  f'    sha256 "{r["sha256"]}"', "  end", ""]
    lines += [
        "  def install",
        "    # MLX publishes wheels only. Homebrew installs a pure-Python wheel resource as the file it is; the",
        "    # platform wheels (fetched unpacked, :nounzip) are installed by path once the rest is in place.",
        "    platform_wheels = resources.select { |r| r.url.end_with?(\".whl\") && !r.url.end_with?(\"-none-any.whl\") }",
        "    venv = virtualenv_install_with_resources(without: platform_wheels.map(&:name))",
        "    platform_wheels.each do |r|",
        "      r.stage { venv.pip_install Pathname.pwd/File.basename(r.url) }",
        "    end",
        "    # A tiny random-weight chat model (tests/fixtures/tiny_gguf.py), for `brew test` only.",
        f'    pkgshare.install "Formula/{TEST_MODEL.name}"',
        "  end",
        "",
        "  def post_install",
        '    (etc/"mlxserve").mkpath',
        "    # launchd refuses to start a job whose working directory or log folder is missing.",
        '    (var/"mlxserve").mkpath',
        '    (var/"log").mkpath',
        '    config = etc/"mlxserve/config.toml"',
        "    return if config.exist?",
        "",
        '    config.write <<~EOS',
        "      # mlxserve settings: one key per setting; `mlxserve config show` lists them all.",
        '      # host = "127.0.0.1"',
        "      # port = 1234",
        "      # ttl = 3600",
        '      # max_memory = "24GB"',
        '      # api_key_file = "/path/to/key"',
        '      # cors = ["http://localhost:3000"]',
        "    EOS",
        "  end",
        "",
        "  service do",
        '    run [opt_bin/"mlxserve", "serve", "--config", etc/"mlxserve/config.toml"]',
        "    keep_alive true",
        '    working_dir var/"mlxserve"',
        '    log_path var/"log/mlxserve.log"',
        '    error_log_path var/"log/mlxserve.err.log"',
        "  end",
        "",
        "  def caveats",
        "    <<~EOS",
        "      Models live in ~/.mlxserve/models (MLXSERVE_HOME moves them); the server's own",
        "      rotating log is ~/.mlxserve/logs/mlxserve.log.",
        "      Settings: #{etc}/mlxserve/config.toml for the service (`mlxserve config show`).",
        "      Service output: #{var}/log/mlxserve.log and #{var}/log/mlxserve.err.log.",
        "      The server answers on http://127.0.0.1:1234/v1; point any OpenAI SDK there.",
        "    EOS",
        "  end",
        "",
        "  test do",
        "    # Imports the tiny GGUF, serves it, and answers a chat completion: the whole path on this Mac's GPU.",
        '    home = testpath/"home"',
        f'    system bin/"mlxserve", "import", pkgshare/"{TEST_MODEL.name}", "--home", home, "--name", "tiny-chat"',
        "    port = free_port",
        '    pid = spawn bin/"mlxserve", "serve", "--home", home, "--port", port.to_s, "--model", "tiny-chat"',
        "    begin",
        '      request = \'{"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}\'',
        '      output = ""',
        "      120.times do",
        "        sleep 1",
        '        output = Utils.popen_read("curl", "-s", "http://127.0.0.1:#{port}/v1/chat/completions",',
        '                                  "-H", "Content-Type: application/json", "-d", request)',
        '        break if output.include?("chat.completion")',
        "      end",
        '      assert_match "\\"object\\":\\"chat.completion\\"", output',
        '      assert_match "\\"completion_tokens\\":", output',
        "    ensure",
        '      Process.kill("TERM", pid)',
        "      Process.wait(pid)",
        "    end",
        "  end",
        "end",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lock", action="store_true", help="re-resolve and re-pin the dependencies (network)")
    mode.add_argument("--check", action="store_true", help="fail if the formula differs from what the lock renders")
    mode.add_argument("--release", nargs=2, metavar=("URL", "SHA256"), help="record the release tarball")
    args = parser.parse_args()
    locked = json.loads(LOCK.read_text()) if LOCK.exists() else {}
    if args.lock:
        locked = lock(locked)
    if args.release:
        locked["source"] = {"url": args.release[0], "sha256": args.release[1]}
    if args.lock or args.release:
        LOCK.write_text(json.dumps(locked, indent=2) + "\n")
    formula = render(locked)
    if args.check:
        if not FORMULA.exists() or FORMULA.read_text() != formula:
            sys.exit(f"{FORMULA.relative_to(ROOT)} is not what {LOCK.relative_to(ROOT)} renders; "
                     "run python scripts/make_formula.py")
        print(f"{FORMULA.relative_to(ROOT)} matches {LOCK.relative_to(ROOT)} ({len(locked['resources'])} resources)")
        return
    FORMULA.parent.mkdir(exist_ok=True)
    FORMULA.write_text(formula)
    print(f"wrote {FORMULA.relative_to(ROOT)} ({len(locked['resources'])} resources)")


if __name__ == "__main__":
    main()
