"""The README's promises: its size, the two commands CI and users copy verbatim, and that its Quick
start command and Python API example run as written (in a temporary copy of the repository)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_BYTES = 8192
QUICKSTART = "pip install . && onnxws compress models/lenet5/model.onnx --loss 1"
CI_TESTS = 'pip install -e ".[dev]" && python -m pytest -q'
TIMEOUT = 300  # seconds per command: a LeNet-5 run takes ~30 s on 2 CPU cores


def _text() -> str:
    return README.read_text(encoding="utf-8")


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """Every fenced block of ``text`` as (language, body without the trailing newline)."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)\n```$", text, re.MULTILINE | re.DOTALL)]


def _marked_block(tag: str) -> tuple[str, str]:
    """The fenced block right after ``<!-- test: TAG -->``."""
    m = re.search(rf"^<!-- test: {re.escape(tag)} -->\n```(\w*)\n(.*?)\n```$", _text(), re.MULTILINE | re.DOTALL)
    assert m, f"README.md has no fenced block right after <!-- test: {tag} -->"
    return m.group(1), m.group(2)


def _env(tmp_path: Path) -> dict[str, str]:
    """This checkout's onnxws first on the path; every user folder (the score cache) inside tmp_path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg-cache")
    return env


def _onnxws() -> list[str]:
    """The console script of the running interpreter's environment (as a user types it), or its entry point."""
    script = Path(sys.executable).with_name("onnxws")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from onnxws.cli import main; sys.argv[0] = 'onnxws'; main()"]


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A copy of the repository's shipped models (outputs of earlier runs left out)."""
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copytree(ROOT / "models", copy / "models", ignore=shutil.ignore_patterns("*.ws.onnx", "*.ws.report"))
    return copy


def test_readme_size() -> None:
    size = README.stat().st_size
    assert size <= MAX_BYTES, f"README.md is {size} bytes; the limit is {MAX_BYTES}"


@pytest.mark.parametrize("command", [QUICKSTART, CI_TESTS])
def test_verbatim_commands_in_own_bash_block(command: str) -> None:
    assert ("bash", command) in _fenced_blocks(_text()), f"README.md lacks a ```bash block holding exactly: {command}"


def test_readme_links_exist() -> None:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _text())
    local = [t for t in targets if "://" not in t]
    assert local, "README.md links no file of the repository"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README.md links missing files: {missing}"


def test_quickstart_runs(repo_copy: Path, tmp_path: Path) -> None:
    lang, body = _marked_block("quickstart")
    assert lang == "bash" and body == QUICKSTART
    # `pip install .` is what .ci/run covers; run the compress part with this environment's onnxws.
    part = next(p.strip() for p in body.split("&&") if p.strip().startswith("onnxws "))
    argv = shlex.split(part)
    model = repo_copy / argv[2]
    cmd = _onnxws() + argv[1:] + ["--cache", str(tmp_path / "cache")]
    run = subprocess.run(cmd, check=False, cwd=repo_copy, env=_env(tmp_path), capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    output = model.with_name(model.name.removesuffix(".onnx") + ".ws.onnx")
    report = model.with_name(model.name.removesuffix(".onnx") + ".ws.report")
    assert output.is_file() and output.stat().st_size > 0
    assert (report / "report.json").is_file() and (report / "report.html").is_file()
    assert (report / "config.toml").is_file()


def test_python_api_example_runs(repo_copy: Path, tmp_path: Path) -> None:
    lang, code = _marked_block("python-api")
    assert lang == "python"
    saved = re.search(r"\.save\(\"([^\"]+)\"", code)
    assert saved, "the Python example should save its result to a path"
    run = subprocess.run([sys.executable, "-c", code], check=False, cwd=repo_copy, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    output = repo_copy / saved.group(1)
    assert output.is_file()
    assert (output.with_name(output.name.removesuffix(".onnx") + ".report") / "report.json").is_file()
    assert (ROOT / saved.group(1)).resolve() != output.resolve()  # it wrote into the copy, not the checkout
