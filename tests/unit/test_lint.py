"""pyflakes finds nothing in the project's Python (unused imports, undefined names, redefinitions)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pyflakes_is_clean():
    folders = [str(ROOT / d) for d in ("pg_analysis", "pg_train", "tests", "figures", "benchmarks", "scripts")]
    run = subprocess.run([sys.executable, "-m", "pyflakes", *folders], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
