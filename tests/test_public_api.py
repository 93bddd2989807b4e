"""The public surface: `atlas.__all__` is complete and sorted, and importing is cheap."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import atlas
from tests.conftest import ROOT


def test_all_is_sorted_and_complete() -> None:
    names = [n for n in atlas.__all__ if n != "__version__"]
    assert names == sorted(names)
    for name in atlas.__all__:
        assert getattr(atlas, name) is not None


def test_help_and_import_load_no_heavy_modules() -> None:
    code = (
        "import sys, atlas.cli\n"
        "try:\n    atlas.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "mods = ('mlflow', 'langgraph', 'langchain_core', 'chromadb', 'torch', 'duckdb')\n"
        "heavy = [m for m in mods"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout
    assert "python -m atlas" in out.stdout


def test_wheel_ships_agents_and_personas_as_data_not_packages(tmp_path: Path) -> None:
    """`agents` is the OpenAI Agents SDK's import name: ATLAS ships its folder as data only."""
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "atlas/_bundled/agents/research.yaml" in names
    assert "atlas/_bundled/personas/researcher.md" in names
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"atlas"}
