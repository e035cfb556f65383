"""A run's files as the report reads them: verified first, read once.

The plain reports (metrics, privacy report, plot) are checked against the run's integrity record
(security/run_integrity.py) from the very bytes that are then parsed, so a file swapped between the
check and the read cannot slip in. The encrypted model and checkpoint are never opened: the report
gives the SHA-256 of their bytes, which anyone can recompute (`sha256sum model.ftenc`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtrain.config import load_toml
from fedtrain.errors import FedtrainError
from fedtrain.security.keys import ModelKey
from fedtrain.security.run_integrity import ABSENT, MANIFEST, sha256
from fedtrain.server.history import METRICS_CSV, METRICS_JSON, PLOT, PRIVACY_JSON, PROTECTED
from fedtrain.server.model_files import CHECKPOINT_FILE, MODEL_FILE, RUN_FILE
from fedtrain.server.verification import run_integrity

CONFIG_FILE = "config.toml"
FINGERPRINTED = (
    MODEL_FILE,
    CHECKPOINT_FILE,
    PRIVACY_JSON,
    METRICS_JSON,
    METRICS_CSV,
    PLOT,
    CONFIG_FILE,
    RUN_FILE,
    MANIFEST,
)
NOT_COVERED = (CONFIG_FILE, RUN_FILE)  # plain files the integrity record does not cover (its MAC binds run and key ids)


@dataclass
class RunFiles:
    """What a report is made of: the run's verified contents and the fingerprints of its files."""

    run_dir: Path
    info: dict[str, Any]  # run.json: run id, key id, fedtrain version, creation time, versions
    config: dict[str, dict[str, Any]]  # config.toml, by section
    rows: list[dict[str, Any]]  # metrics.json, one per round
    privacy: dict[str, Any]  # privacy.json
    states: dict[str, str]  # file -> "ok" (every protected file, as verified)
    fingerprints: dict[str, str] = field(default_factory=dict)  # file -> SHA-256 of its bytes (present files)

    @property
    def name(self) -> str:
        return self.run_dir.resolve().name

    @property
    def run_id(self) -> str:
        return str(self.info["run_id"])


def load_verified_run(run_dir: Path, model_key: ModelKey) -> RunFiles:
    """Read a run directory for a report, refusing it unless its reports are as fedtrain wrote them.

    Args:
        run_dir: a run directory written by fedtrain (at least one finished round).
        model_key: the run's model key (it authenticates the integrity record; nothing is decrypted).

    Returns:
        The run's verified files.

    Raises:
        FedtrainError: not a run directory, the wrong key, no integrity record, a report edited,
            deleted or added behind fedtrain's back, or a run without a finished round.
    """
    run_dir = Path(run_dir)
    integrity = run_integrity(run_dir, model_key)
    recorded = integrity.recorded()
    if recorded is None:
        raise FedtrainError(
            f"{run_dir} has no {MANIFEST}, so its reports cannot be verified and fedtrain writes no report for it "
            "(the run has no finished round, or was written before runs carried integrity records)."
        )
    contents: dict[str, bytes] = {}
    states: dict[str, str] = {}
    for name in sorted({*PROTECTED, *recorded}):
        path = run_dir / name
        data = path.read_bytes() if path.is_file() else None
        if data is not None:
            contents[name] = data
        if name not in recorded:
            states[name] = "ok" if data is None else "not recorded"
        elif data is None:
            states[name] = "ok" if ABSENT in recorded[name] else "deleted"
        else:
            states[name] = "ok" if sha256(data) in recorded[name] else "edited"
    bad = [f"{name} ({state})" for name, state in states.items() if state != "ok"]
    if bad:
        raise FedtrainError(
            f"{', '.join(bad)} of {run_dir} {'is' if len(bad) == 1 else 'are'} not as fedtrain wrote "
            f"{'it' if len(bad) == 1 else 'them'}, so fedtrain writes no report for this run "
            f"(`fedtrain verify {run_dir}` lists every file)."
        )
    if METRICS_JSON not in contents or PRIVACY_JSON not in contents:
        raise FedtrainError(
            f"{run_dir} has no finished round yet (no {METRICS_JSON} or {PRIVACY_JSON}); nothing to report."
        )
    rows = _json(contents[METRICS_JSON], run_dir / METRICS_JSON)
    privacy = _json(contents[PRIVACY_JSON], run_dir / PRIVACY_JSON)
    if not isinstance(rows, list) or not rows or not isinstance(privacy, dict):
        raise FedtrainError(f"{run_dir} has no finished round yet ({METRICS_JSON} is empty); nothing to report.")
    fingerprints = {
        name: sha256(contents[name]) if name in contents else sha256((run_dir / name).read_bytes())
        for name in FINGERPRINTED
        if name in contents or (run_dir / name).is_file()
    }
    return RunFiles(
        run_dir=run_dir,
        info=json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8")),
        config=_config_sections(run_dir / CONFIG_FILE),
        rows=rows,
        privacy=privacy,
        states=states,
        fingerprints=fingerprints,
    )


def _json(data: bytes, path: Path) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedtrainError(f"{path} is not valid JSON ({exc}); the run directory is damaged.") from None


def _config_sections(path: Path) -> dict[str, dict[str, Any]]:
    """config.toml by section, as fedtrain wrote it (sections, or flat keys under one heading)."""
    from fedtrain.config import FLAT

    if not path.is_file():
        return {}
    flat = load_toml(path)
    sections: dict[str, dict[str, Any]] = {}
    for key, item in flat.items():
        section, name = FLAT.get(key, ("other", key))
        sections.setdefault(section, {})[name] = item
    return sections
