"""`fedtrain report`: one self-contained HTML page per run, with the privacy card every client's
numbers come from (privacy.json), written only for a run whose files are as fedtrain wrote them."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fedtrain.security.keys import load_model_key, read_key_file
from fedtrain.server import plots
from fedtrain.server.report import load_verified_run, render
from fedtrain.server.report.training import missing_by_reason, rounds_ranges
from tests.conftest import run_cli
from tests.test_cli_errors import _assert_user_error

SECTIONS = (
    "verified", "summary", "privacy-card", "protections", "clients", "client-epsilons", "released", "audit",
    "epsilon-meaning", "training", "chart-metric", "chart-loss", "chart-metric-epsilon", "chart-client-epsilon",
    "refusals", "timing", "chart-participation", "chart-seconds", "rounds", "run", "configuration", "versions",
    "key", "key-id", "fingerprints", "integrity",
)  # fmt: skip
CHARTS = [s for s in SECTIONS if s.startswith("chart-")]


class Page(HTMLParser):
    """Every element with its attributes, the text under each id, and the client rows."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.open_ids: list[tuple[str, str]] = []  # (tag, id) of elements still open
        self.text: dict[str, str] = {}
        self.svg_in: set[str] = set()
        self.clients: dict[str, dict[str, str | None]] = {}
        self.client_text: dict[str, str] = {}
        self._client: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if "id" in attributes:
            self.open_ids.append((tag, str(attributes["id"])))
            self.text.setdefault(str(attributes["id"]), "")
        if tag == "svg":
            self.svg_in.update(i for _, i in self.open_ids)
        if tag == "tr" and attributes.get("data-client"):
            self._client = str(attributes["data-client"])
            self.clients[self._client] = attributes
            self.client_text[self._client] = ""

    def handle_endtag(self, tag):
        for index in range(len(self.open_ids) - 1, -1, -1):
            if self.open_ids[index][0] == tag:
                del self.open_ids[index]
                break
        if tag == "tr":
            self._client = None

    def handle_data(self, data):
        for _, element in self.open_ids:
            self.text[element] += data + " "
        if self._client is not None:
            self.client_text[self._client] += data + " "


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


@pytest.fixture
def run_copy(tracked_demo_run, tmp_path) -> tuple[Path, Path]:
    copy = tmp_path / "run"
    shutil.copytree(tracked_demo_run["run_dir"], copy)
    return copy, tracked_demo_run["key"]


def test_the_report_of_the_demo_run_is_one_self_contained_page_with_every_section(run_copy, tmp_path, capsys):
    run_dir, key = run_copy
    out_dir = tmp_path / "usb-stick"
    out_dir.mkdir()
    code, out, err = run_cli(["report", str(run_dir), "--out", str(out_dir / "report.html"), "--key-file", str(key)],
                             capsys)  # fmt: skip
    assert code == 0, err
    assert "its files were verified first" in " ".join(out.split())
    assert [p.name for p in out_dir.iterdir()] == ["report.html"]  # one file, nothing beside it
    text = (out_dir / "report.html").read_text(encoding="utf-8")
    page = parse(text)

    # nothing outside the file: no script, stylesheet, frame or object; images inline; links to its own ids
    tags = {tag for tag, _ in page.tags}
    assert not tags & {"script", "link", "iframe", "object", "embed", "base", "img", "image"}, tags
    for tag, attributes in page.tags:
        for name, value in attributes.items():
            if name in ("href", "src", "xlink:href", "action", "poster", "srcset"):
                assert value is not None and value.startswith("#"), (tag, name, value)
    lowered = text.lower()
    for outside in ("http:", "https:", "//", "@import", "file:", "data:"):
        assert outside not in lowered.replace("</", ""), outside  # "</" closes tags; "//" would be a URL
    assert "url(" not in lowered.replace("url(#", "")  # SVG clip paths refer to their own ids
    assert "default-src 'none'" in text  # the browser is told to load nothing, too

    assert set(SECTIONS) <= set(page.text), set(SECTIONS) - set(page.text)
    assert set(CHARTS) <= page.svg_in, set(CHARTS) - page.svg_in
    assert "No audit was run" in page.text["audit"]

    # every client's numbers are privacy.json's, as they are and as shown
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert set(page.clients) == set(privacy["clients"]) and len(page.clients) == 5
    for cid, info in privacy["clients"].items():
        row = page.clients[cid]
        assert float(row["data-epsilon"]) == info["epsilon"]
        assert float(row["data-delta"]) == info["delta"]
        assert row["data-accountant"] == info["accountant"]
        assert float(row["data-lifetime-epsilon"]) == info["lifetime_epsilon"]
        assert f"{info['epsilon']:.3f}" in page.client_text[cid]
        training = [e for e in info["ledger"] if e["kind"] == "train"]
        assert f" {sum(e['steps'] for e in training)} " in page.client_text[cid]
    worst = max(c["epsilon"] for c in privacy["clients"].values())
    meaning = " ".join(page.text["epsilon-meaning"].split())
    assert f"epsilon = {worst:.3f}" in meaning
    assert f"{100 * math.exp(worst) / (1 + math.exp(worst)):.1f}% sure" in meaning

    # every round, the run's key id (never the key) and the fingerprints of the files it describes
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert text.count('<tr><td class="num">') == len(rows) == 3
    info = json.loads((run_dir / "run.json").read_text())
    assert page.text["key-id"].strip() == info["key_id"]
    key_bytes = read_key_file(key)
    for form in (key_bytes.hex(), base64.urlsafe_b64encode(key_bytes).decode(), base64.b64encode(key_bytes).decode(),
                 key.read_text().strip()):  # fmt: skip
        assert form not in text
    for name in ("model.ftenc", "privacy.json", "checkpoint.ftenc", "metrics.json"):
        assert hashlib.sha256((run_dir / name).read_bytes()).hexdigest() in page.text["fingerprints"], name
    for name, version in info["versions"].items():
        assert version in page.text["versions"], name


def test_a_tampered_privacy_json_gets_no_report(run_copy, capsys):
    run_dir, key = run_copy
    report = json.loads((run_dir / "privacy.json").read_text())
    for client in report["clients"].values():
        client["epsilon"] = client["epsilon"] / 10  # a nicer number for the ethics board
    (run_dir / "privacy.json").write_text(json.dumps(report, indent=2) + "\n")
    out = run_dir.parent / "report.html"
    code, _, err = run_cli(["report", str(run_dir), "--out", str(out), "--key-file", str(key)], capsys)
    _assert_user_error(code, err, f"privacy.json (edited) of {run_dir} is not as fedtrain wrote it, so fedtrain "
                                  "writes no report for this run")  # fmt: skip
    message = " ".join(err.split()).removeprefix("error: ")
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence
    assert not out.exists()


def test_a_report_needs_the_runs_key(run_copy, tmp_path, capsys):
    from fedtrain.security.keys import generate_key, write_key_file

    run_dir, _ = run_copy
    (run_dir / "report.html").unlink()  # the tracked run attached one at its end
    other = write_key_file(tmp_path / "other.key", generate_key())
    code, _, err = run_cli(["report", str(run_dir), "--key-file", str(other)], capsys)
    _assert_user_error(code, err, "is sealed with key")
    assert not (run_dir / "report.html").exists()


def test_an_audit_lower_bound_is_shown_beside_the_accounted_epsilon(tracked_demo_run):
    files = load_verified_run(tracked_demo_run["run_dir"], load_model_key(str(tracked_demo_run["key"])))
    files.privacy["audit"] = {"epsilon_lower": 0.42, "m": 1000, "k": 100, "confidence": 0.95, "kind": "one-run"}
    files.privacy["clients"]["client-1"]["audit"] = {"epsilon_lower": 9.5, "m": 500, "confidence": 0.95}
    page = parse(render(files))
    audit = " ".join(page.text["audit"].split())
    assert "No audit was run" not in audit
    assert "the run 0.420" in audit and "m = 1000, k = 100, confidence = 0.95, kind = one-run" in audit
    assert "below the accounted epsilon" in audit
    assert "client-1 9.500" in audit and "ABOVE the accounted epsilon" in audit  # a broken accountant shows


def test_refusals_and_failures_are_grouped_by_reason(tracked_demo_run):
    rows = [
        {"round": 1, "refused": {}, "failed": {"client-2": "data error"}},
        {"round": 2, "refused": {"client-0": "budget spent", "client-1": "budget spent"}, "failed": {}},
        {"round": 3, "refused": {"client-0": "budget spent"}, "failed": {"client-2": "data error"}},
    ]
    groups = [(m.kind, m.reason, m.clients, m.rounds, m.count) for m in missing_by_reason(rows)]
    assert groups == [
        ("refused", "budget spent", ["client-0", "client-1"], [2, 3], 3),
        ("failed", "data error", ["client-2"], [1, 3], 2),
    ]
    assert rounds_ranges([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8"
    files = load_verified_run(tracked_demo_run["run_dir"], load_model_key(str(tracked_demo_run["key"])))
    files.rows = [{**row, **extra} for row, extra in zip(files.rows, rows, strict=True)]
    refusals = " ".join(parse(render(files)).text["refusals"].split())
    assert "refused budget spent client-0, client-1 2-3 3" in refusals
    assert "failed data error client-2 1, 3 2" in refusals


def test_training_png_has_integer_rounds_a_line_per_client_and_accuracy_against_epsilon():
    rows = [
        {"round": r, "accuracy": 0.5 + r / 20, "federated_accuracy": None, "epsilon_max": 0.4 * r,
         "epsilon": {"a": 0.3 * r, "b": 0.4 * r, "c": 0.2 * r}}
        for r in range(1, 8)
    ]  # fmt: skip
    figure = plots.training_figure(rows)
    assert plots.png(figure).startswith(b"\x89PNG")  # drawn, so the ticks are final
    per_round, per_client, against_epsilon = figure.axes
    for axis in (per_round, per_client):
        low, high = axis.get_xlim()
        ticks = [t for t in axis.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert sorted(line.get_label() for line in per_client.get_lines()) == ["a", "b", "c"]
    (curve,) = against_epsilon.get_lines()
    assert list(curve.get_xdata()) == [row["epsilon_max"] for row in rows]
    assert list(curve.get_ydata()) == [row["accuracy"] for row in rows]


def test_names_from_the_run_are_text_never_markup(tracked_demo_run):
    """A client name (chosen by whoever provisioned the kits) cannot inject anything into the page."""
    files = load_verified_run(tracked_demo_run["run_dir"], load_model_key(str(tracked_demo_run["key"])))
    hostile = '<script>alert("x")</script><img src=http://evil.example/x>'
    files.privacy["clients"][hostile] = files.privacy["clients"].pop("client-0")
    for row in files.rows:
        row["epsilon"][hostile] = row["epsilon"].pop("client-0")
        row["refused"] = {hostile: "<b>budget</b>"}
    text = render(files)
    assert "<script" not in text and "<img" not in text and "<b>" not in text
    assert text.count("&lt;script&gt;") >= 3  # shown as text: the client table, the refusals, the chart's legend
