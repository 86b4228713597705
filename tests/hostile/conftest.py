"""Fixtures of the hostile-input matrix: a user's world in a temporary folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import build_tiny


@pytest.fixture(scope="session")
def _tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("hostile") / "llama")


@pytest.fixture
def world(tmp_path: Path, _tiny_llama: Path) -> Path:
    """tmp_path/home holding `model` (a tiny Llama checkpoint) and `calib.txt`; tests add what
    they need and snapshot the whole folder."""
    from conftest import CALIB_TEXT

    home = tmp_path / "home"
    home.mkdir()
    shutil.copytree(_tiny_llama, home / "model")
    (home / "calib.txt").write_text(CALIB_TEXT)
    return home
