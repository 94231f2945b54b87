# The source passes the linter (pyflakes rules and syntax errors), as asyncpg checks its own.
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.fail("ruff is part of the test extras: pip install -e '.[test]'")
    r = subprocess.run([ruff, "check", "--select", "F,E9", "--no-cache", "pgguard", "tests",
                        "bench"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
