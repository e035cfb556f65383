"""`fedtrain report`: one self-contained HTML page about a finished (or stopped) run, for whoever
signs it off: the privacy card in plain words first, then the training and the run's details.

    run_files.py   read the run's files, verified against its integrity record first
    card.py        the privacy card's facts: protections, spending, releases, audit, epsilon in words
    training.py    refusals and failures by reason, time per round
    page.py        the HTML page (inline CSS and SVG charts from server/plots.py; no script, no network)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedtrain.fileio import atomic_write_text
from fedtrain.security.keys import ModelKey
from fedtrain.server.report.page import render
from fedtrain.server.report.run_files import RunFiles, load_verified_run

REPORT_FILE = "report.html"


@dataclass
class WrittenReport:
    path: Path
    files: RunFiles  # what it was made of, verified


def write_report(run_dir: Path, model_key: ModelKey, out: Path | None = None) -> WrittenReport:
    """Verify a run's files and write its report, atomically.

    Args:
        run_dir: a run directory written by fedtrain.
        model_key: the run's model key (it authenticates the integrity record; nothing is decrypted).
        out: where to write the HTML (default: report.html in the run directory).

    Returns:
        Where the report was written, and the verified files it was made of.

    Raises:
        FedtrainError: the run cannot be verified (edited, deleted or unrecorded reports, wrong key,
            no integrity record) or has no finished round; nothing is written then.
    """
    files = load_verified_run(run_dir, model_key)
    path = Path(out) if out is not None else Path(run_dir) / REPORT_FILE
    atomic_write_text(path, render(files))
    return WrittenReport(path, files)


__all__ = ["REPORT_FILE", "RunFiles", "WrittenReport", "load_verified_run", "render", "write_report"]
