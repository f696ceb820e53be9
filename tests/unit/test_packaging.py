"""The built wheel installs one top-level package, ``asyncstore``, and nothing generic.

Builds the wheel from this checkout with pip (the project's own build backend) and reads its
file list: every module of ``storage/`` and ``orchestrator/`` under ``asyncstore/``, every
SQL file, no ``benchmarks`` or ``tests``, and the console script pointing into
``asyncstore``.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("asyncstore-*.whl")
    return zipfile.ZipFile(built)


def test_one_top_level_package(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"asyncstore"}
    top_level = next(n for n in wheel.namelist() if n.endswith("top_level.txt"))
    assert wheel.read(top_level).decode().split() == ["asyncstore"]


def test_every_module_and_sql_file_is_shipped(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for folder in ("storage", "orchestrator"):
        for source in (ROOT / folder).rglob("*"):
            if source.suffix not in {".py", ".sql"} or "__pycache__" in source.parts:
                continue
            shipped = "asyncstore/" + source.relative_to(ROOT).as_posix()
            assert shipped in names, f"{shipped} missing from the wheel"
    assert "asyncstore/__init__.py" in names and "asyncstore/py.typed" in names
    assert not any(n.startswith(("benchmarks/", "tests/", "asyncstore/benchmarks")) for n in names)


def test_console_script_points_into_the_package(wheel: zipfile.ZipFile) -> None:
    entry = next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))
    assert "asyncstore = asyncstore.orchestrator.cli:main" in wheel.read(entry).decode()
