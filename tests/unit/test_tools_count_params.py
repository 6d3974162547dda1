"""tools/count_params.py: the CLI prints the meta-device counts and rejects unknown names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs tools/count_params.py in a subprocess

TOOL = Path(__file__).resolve().parents[2] / "tools" / "count_params.py"


def test_prints_counts_equal_to_analytic(tmp_path):
    out = tmp_path / "counts.json"
    proc = subprocess.run(
        [sys.executable, str(TOOL), "tiny", "navil-2b", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "navil-2b     4,040,942,528   2,530,993,088     625,589,696" in proc.stdout
    assert "equal to the analytic counts" in proc.stdout
    assert out.read_text().count('"activated"') == 2


def test_unknown_config_is_a_one_line_error():
    proc = subprocess.run(
        [sys.executable, str(TOOL), "navil-7b"], capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unknown config 'navil-7b'" in proc.stderr and "Traceback" not in proc.stderr
