"""Every example in examples/ runs as written, at small size (issue 16, acceptance 4)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))
EXPECTED = {
    "tabular_regression.py": "R^2 on the central test split",
    "image_folder.py": "accuracy on the central test split",
    "text_adapters.py": "trained and sent: ['project.down.weight', 'project.up.weight', 'head.weight', 'head.bias']",
}


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES) == sorted(EXPECTED)


@pytest.mark.e2e
@pytest.mark.timeout(400)
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(example: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(example), "--small"], capture_output=True, text=True, timeout=360,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert EXPECTED[example.name] in done.stdout, done.stdout
    assert "epsilon per client" in done.stdout
