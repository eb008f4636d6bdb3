"""The container image's install step, without a container engine: the files deploy/Dockerfile
copies into its build stage are built into a wheel exactly as its `pip install --no-deps .`
does, installed into an empty directory, and every component's subcommand starts from there
(``--help`` parses its whole config)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def build_stage_copies() -> list[str]:
    """Sources of the build stage's ``COPY`` lines (the runtime stage copies from it)."""
    text = DOCKERFILE.read_text()
    build = text[text.index(" AS build") : text.index("\nFROM ", text.index(" AS build"))]
    sources = []
    for line in build.splitlines():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    return sources


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as the image installs it, in a directory of its own."""
    work = tmp_path_factory.mktemp("image")
    context = work / "src"
    context.mkdir()
    for source in build_stage_copies():
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, context / source)
    # The venv's setuptools instead of an isolated build env: same backend, no download.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(work / "dist"), str(context)],
        check=True,
    )  # fmt: skip
    [wheel] = (work / "dist").glob("*.whl")
    site = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
    )  # fmt: skip
    with zipfile.ZipFile(wheel) as z:
        entry_points = next(n for n in z.namelist() if n.endswith("entry_points.txt"))
        assert re.search(r"^rlhf = rlhf\.cli:main$", z.read(entry_points).decode(), re.M)
    return site


def test_build_context_is_what_the_dockerfile_copies() -> None:
    sources = build_stage_copies()
    assert sources == [
        "requirements.lock",
        "pyproject.toml",
        "README.md",
        "rlhf",
        "services",
        "trainer",
    ]
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    for source in [*sources, "data"]:
        assert (ROOT / source).exists(), source
        assert f"!{source}" in ignore or f"!{source}/**" in ignore, source


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["serve", "policy", "--help"],
        ["serve", "reward", "--help"],
        ["serve", "feedback", "--help"],
        ["train", "--help"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_each_component_starts_from_the_installed_package(installed: Path, argv: list[str]) -> None:
    code = "import sys; from rlhf.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        # Outside the checkout, so only the installed copy can be imported.
        cwd=installed.parent,
        env={**os.environ, "PYTHONPATH": str(installed)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage:" in done.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import rlhf; print(rlhf.__file__)"],
        capture_output=True,
        text=True,
        cwd=installed.parent,
        env={**os.environ, "PYTHONPATH": str(installed)},
    )
    assert probe.stdout.strip().startswith(str(installed))
