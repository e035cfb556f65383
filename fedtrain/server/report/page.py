"""The report as one self-contained HTML page: inline CSS, charts as inline SVG, no script, nothing
fetched (a Content-Security-Policy forbids it too), so it opens the same from a USB stick.

Read by a non-expert first (in short, the privacy card, in words) and an engineer second (charts,
every round, the configuration, versions and fingerprints). Every value from the run is escaped.
"""

from __future__ import annotations

import html
import math
import platform
import time
from importlib import metadata
from typing import Any

from fedtrain.server import plots
from fedtrain.server.report import card, training
from fedtrain.server.report.run_files import NOT_COVERED, RunFiles

VERSIONED = ("fedtrain", "flwr", "opacus", "torch", "numpy", "cryptography")

STYLE = """
:root { --ink: #1d1d1f; --muted: #5f6368; --line: #d9dce1; --soft: #f4f6f8; --ok: #1e7b43; --off: #8a8f98;
        --warn: #a4321b; --accent: #1f5fa8; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--ink);
       margin: 0; background: #fff; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 21px; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--ink); }
h3 { font-size: 17px; margin: 24px 0 6px; }
p { margin: 6px 0; }
.meta, .note { color: var(--muted); font-size: 13px; }
.banner { border-left: 5px solid var(--ok); background: #eef7f1; padding: 10px 14px; margin: 16px 0; }
.banner.warn { border-color: var(--warn); background: #fbefec; }
nav { font-size: 14px; margin: 8px 0 0; }
nav a { color: var(--accent); margin-right: 14px; text-decoration: none; }
.summary { display: grid; grid-template-columns: repeat(auto-fit, minmax(200px, 1fr)); gap: 12px; margin: 12px 0; }
.fact { background: var(--soft); border-radius: 8px; padding: 12px 14px; }
.fact .big { font-size: 24px; font-weight: 600; }
.fact .label { color: var(--muted); font-size: 13px; }
table { border-collapse: collapse; width: 100%; margin: 8px 0; font-size: 14px; }
th, td { text-align: left; vertical-align: top; padding: 6px 8px; border-bottom: 1px solid var(--line); }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         color: #fff; background: var(--ok); white-space: nowrap; }
.badge.off { background: var(--off); }
.badge.warn { background: var(--warn); }
.config { display: grid; grid-template-columns: repeat(auto-fit, minmax(330px, 1fr)); gap: 0 20px; }
.config table { font-size: 13px; } .config td, .config th { padding: 3px 8px; overflow-wrap: anywhere; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 16px; }
figure { margin: 8px 0; }
figure svg { width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 13px; }
svg text { font-family: system-ui, "DejaVu Sans", sans-serif; }
code, .hash { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12.5px; word-break: break-all; }
details summary { cursor: pointer; color: var(--accent); margin: 8px 0; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
@media print { main { max-width: none; padding: 0; } h2 { break-before: page; } figure, table { break-inside: avoid; }
               details { display: block; } nav { display: none; } }
"""


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return esc(value)


def table(
    head: list[str],
    rows: list[list[str]],
    numeric: set[int] | None = None,
    row_attrs: list[str] | None = None,
    attrs: str = "",
) -> str:
    """An HTML table; `rows` hold HTML (escape text first), `numeric` the right-aligned columns."""
    numeric = numeric or set()
    cls = [' class="num"' if i in numeric else "" for i in range(len(head))]
    out = [f"<table{attrs}><thead><tr>", *(f"<th{cls[i]}>{h}</th>" for i, h in enumerate(head)), "</tr></thead><tbody>"]
    for index, row in enumerate(rows):
        extra = row_attrs[index] if row_attrs else ""
        out.append(f"<tr{extra}>" + "".join(f"<td{cls[i]}>{c}</td>" for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def badge(text: str, kind: str = "") -> str:
    return f'<span class="badge {kind}">{esc(text)}</span>'


def chart(chart_id: str, draw: Any, rows: list[dict[str, Any]], caption: str) -> str:
    return (
        f'<figure id="{chart_id}">{plots.svg(plots.figure(draw, rows))}<figcaption>{esc(caption)}</figcaption></figure>'
    )


# ---------------------------------------------------------------------------------------------- sections


def header(files: RunFiles, generated: str) -> str:
    info = files.info
    return (
        f"<header><h1>Privacy card and training report</h1>"
        f'<p class="meta">run <strong>{esc(files.name)}</strong> (id <code>{esc(files.run_id)}</code>), created '
        f"{esc(info.get('created', '?'))} by fedtrain {esc(info.get('fedtrain_version', '?'))}; this report written "
        f"{esc(generated)} by fedtrain {esc(_version('fedtrain'))}.</p>"
        '<div class="banner" id="verified"><strong>Verified.</strong> metrics.json, metrics.csv, privacy.json and '
        "training.png were checked against the run's integrity record (HMAC-SHA256 under the run's model key) "
        "before this report was made: they are exactly as fedtrain wrote them. The encrypted model was not "
        "opened.</div>"
        '<nav><a href="#summary">In short</a><a href="#privacy-card">Privacy card</a>'
        '<a href="#training">Training</a><a href="#run">The run</a></nav></header>'
    )


def summary(files: RunFiles) -> str:
    rows, config = files.rows, files.config
    last = rows[-1]
    federation, training_cfg = config.get("federation", {}), config.get("training", {})
    spending = card.client_spending(files)
    metric = plots.headline(rows)
    planned = federation.get("rounds", len(rows))
    worst = max(spending, key=lambda s: s.epsilon) if spending else None
    where = (
        f"{len(spending)} clients, each holding its own data on its own machine,"
        if card.is_deployment(files)
        else f"This was a simulation: the dataset <code>{esc(config.get('data', {}).get('source', '?'))}</code> "
        f"was split into {len(spending)} private shards, one per simulated client. The clients"
    )
    facts = [
        (
            num(last.get("accuracy"), 4),
            f"final {metric}" + (" (server's test split)" if _central(rows) else " (clients' data, noisy)"),
        ),
        (num(worst.epsilon) if worst else "-", "largest epsilon of any client (this run)"),
        (
            _one_in(worst.delta) if worst else "-",
            f"delta = {worst.delta:.0e}: the chance the bound fails" if worst else "delta",
        ),
        (f"{last['round']} / {planned}", "rounds finished / planned"),
    ]
    boxes = "".join(
        f'<div class="fact"><div class="big">{v}</div><div class="label">{esc(k)}</div></div>' for v, k in facts
    )
    lines = [
        f"{where} trained one shared model (<code>{esc(training_cfg.get('model', '?'))}</code>) together over "
        f"{last['round']} rounds. No record left any client: only model updates and the metrics the privacy "
        "card lists did, each under the guarantee it names.",
    ]
    if worst is not None:
        lines.append(
            f"Every client's data is protected by differential privacy: for this run, epsilon is at most "
            f"{worst.epsilon:.3f} (delta {worst.delta:.0e}) for every client; what that means for one person is "
            'explained <a href="#epsilon-meaning">below</a>.'
        )
    warnings = []
    if last["round"] < planned:
        warnings.append(f"The run stopped after round {last['round']} of {planned} (see refusals and failures).")
    plain = [s.client for s in spending if s.metrics == "plain"]
    if plain:
        warnings.append(f"Exact metrics of {', '.join(plain)} left those clients outside the guarantee.")
    missing = training.missing_by_reason(rows)
    if missing:
        warnings.append(
            f"{sum(m.count for m in missing)} client-rounds refused or failed; every reason is listed under Training."
        )
    warn = "".join(f'<div class="banner warn">{esc(w)}</div>' for w in warnings)
    return (
        f'<section id="summary"><h2>In short</h2><div class="summary">{boxes}</div>'
        + "".join(f"<p>{line}</p>" for line in lines)
        + warn
        + "</section>"
    )


def _one_in(delta: float) -> str:
    return f"1 in {round(1 / delta):,}" if 0 < delta < 1 else f"{delta:g}"


def _central(rows: list[dict[str, Any]]) -> bool:
    return any(
        math.isfinite(plots.value(r, "accuracy")) and r.get("accuracy") != r.get("federated_accuracy") for r in rows
    )


def privacy_card(files: RunFiles) -> str:
    parts = ['<section id="privacy-card"><h2>Privacy card</h2>']
    rows = [
        [esc(p.name), badge(p.status, "" if p.on else "off"), esc(p.protects), esc(p.against)]
        for p in card.protections(files)
    ]
    parts.append(
        '<div id="protections"><h3>What was protected, and against whom</h3>'
        + table(["protection", "in this run", "what it protects", "against whom"], rows)
        + "</div>"
    )
    parts.append(_clients(files))
    parts.append(_client_level(files))
    released = [
        [
            esc(r.what),
            (esc(r.guarantee) if r.covered else badge("outside the guarantee", "warn") + " " + esc(r.guarantee)),
        ]
        for r in card.releases(files)
    ]
    parts.append(
        '<div id="released"><h3>What left the clients, and under which guarantee</h3>'
        + table(["what", "guarantee"], released)
        + "</div>"
    )
    parts.append(_audit(files))
    parts.append(_meaning(files))
    parts.append("</section>")
    return "".join(parts)


def _clients(files: RunFiles) -> str:
    spending = card.client_spending(files)
    privacy = files.config.get("privacy", {})
    rows, attrs = [], []
    for s in spending:
        rows.append(
            [
                esc(s.client),
                f"<strong>{s.epsilon:.3f}</strong>",
                f"{s.delta:.0e}",
                esc(s.accountant.upper()),
                num(s.lifetime_epsilon) if s.lifetime_epsilon is not None else '<span class="note">not shared</span>',
                str(s.training_rounds) if not s.tunings else f"{s.tunings} private tuning(s)",
                str(s.steps),
                str(s.releases),
                esc(s.metrics),
            ]
        )
        attrs.append(
            f' data-client="{esc(s.client)}" data-epsilon="{s.epsilon!r}" data-delta="{s.delta!r}" '
            f'data-accountant="{esc(s.accountant)}" data-lifetime-epsilon="{s.lifetime_epsilon!r}"'
        )
    asked = []
    if privacy.get("target_epsilon") is not None:
        asked.append(f"the run aimed at epsilon {privacy['target_epsilon']:g} for the whole training")
    if privacy.get("noise_multiplier") is not None:
        asked.append(f"the run fixed the noise multiplier at {privacy['noise_multiplier']:g}")
    if privacy.get("max_epsilon") is not None:
        asked.append(f"a client stops at epsilon {privacy['max_epsilon']:g}")
    accountants = sorted({s.accountant for s in spending})
    notes = [
        "epsilon composes every DP-SGD round and every metric release of this run on the client's own ledger; "
        "privacy.json lists every one, so anyone can recompute it with another accountant (docs/privacy.md).",
        "Lifetime: every run ever over the same data, as the client itself reports it (its own cap holds whatever "
        'the server does); "not shared" where its policy keeps it private.',
        "Accountant: " + "; ".join(card.ACCOUNTANTS.get(a, a) for a in accountants) + ".",
    ]
    if any(s.tunings for s in spending):
        notes.insert(
            0,
            "This run was chosen by a private tuning: the ledger charges the best of a secret, random number of "
            "trials once (Papernot and Steinke, Theorem 2), which covers every trial's training; DP-SGD steps "
            "are those of one trial.",
        )
    if asked:
        notes.insert(0, "Budget: " + "; ".join(asked) + "; each client also applies its own policy's caps.")
    head = [
        "client",
        "epsilon (this run)",
        "delta",
        "accountant",
        "epsilon (lifetime)",
        "training rounds",
        "DP-SGD steps",
        "metric releases",
        "metrics",
    ]
    return (
        '<div id="clients"><h3>What each client spent</h3>'
        + table(head, rows, numeric={1, 2, 4, 5, 6, 7}, row_attrs=attrs, attrs=' id="client-epsilons"')
        + "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
        + "</div>"
    )


def _client_level(files: RunFiles) -> str:
    level = files.privacy.get("client_level")
    if not level:
        return ""
    return (
        '<div id="client-level"><h3>Client-level differential privacy</h3>'
        f"<p>Whether a whole client took part: epsilon <strong>{num(level.get('epsilon'))}</strong> at delta "
        f"{level.get('delta', 0):.0e}, over {len(level.get('released_rounds', []))} released rounds, noise "
        f"multiplier {esc(level.get('noise_multiplier'))}.</p>"
        f'<p class="note">{esc(level.get("mechanism", ""))}; {esc(level.get("sampling", ""))}; neighbouring '
        f"datasets: {esc(level.get('neighbouring', ''))}; accountant: {esc(level.get('accountant', ''))}.</p></div>"
    )


def _audit(files: RunFiles) -> str:
    found = card.audits(files)
    if not found:
        body = (
            "<p><strong>No audit was run.</strong> The epsilons above are the accountant's upper bounds; "
            "no empirical lower bound (a canary audit, <code>fedtrain audit</code>) was measured for this run.</p>"
        )
    else:
        accounted = {s.client: s.epsilon for s in card.client_spending(files)}
        worst = max(accounted.values(), default=math.nan)  # a run-wide audit is held against the largest
        rows = [
            [
                esc(a.scope),
                f"<strong>{a.epsilon_lower:.3f}</strong>",
                esc(", ".join(f"{k} = {v}" for k, v in a.details.items()) or "-"),
                badge("below the accounted epsilon")
                if a.epsilon_lower <= accounted.get(a.scope, worst)
                else badge("ABOVE the accounted epsilon", "warn"),
            ]
            for a in found
        ]
        body = (
            "<p>An audit measures how much privacy training actually leaked, from the outside: a lower bound "
            "that must stay below the accounted epsilon (if it does not, the accounting or the code is wrong).</p>"
            + table(
                ["scope", "epsilon (lower bound)", "how it was measured", "against the accounted epsilon"],
                rows,
                numeric={1},
            )
        )
    return f'<div id="audit"><h3>Empirical check (audit)</h3>{body}</div>'


def _meaning(files: RunFiles) -> str:
    spending = card.client_spending(files)
    if not spending:
        return '<div id="epsilon-meaning"><h3>What epsilon means</h3><p>No client reported a privacy record.</p></div>'
    worst = max(spending, key=lambda s: s.epsilon)
    sentences = card.epsilon_meaning(worst.epsilon, worst.delta)
    return (
        f'<div id="epsilon-meaning"><h3>What epsilon = {worst.epsilon:.3f} means for one person\'s record</h3>'
        + "".join(f"<p>{esc(s)}</p>" for s in sentences)
        + "</div>"
    )


def training_section(files: RunFiles) -> str:
    rows = files.rows
    metric = plots.headline(rows)
    charts = [
        chart(
            "chart-metric",
            plots.draw_metric,
            rows,
            f"{metric} after each round: central on the server's test split (simulation only), federated on the "
            "clients' held-out data as released, with noise for privacy (its standard deviation in the legend; "
            "drawn as a band where it is small enough to show).",
        ),
        chart(
            "chart-loss",
            plots.draw_loss,
            rows,
            "loss after each round; the clients' losses are released with "
            "noise (privacy), so they jump from round to round.",
        ),
        chart(
            "chart-metric-epsilon",
            plots.draw_metric_vs_epsilon,
            rows,
            f"{metric} against the largest epsilon "
            "any client had spent by then (rN: round N): what each unit of privacy bought.",
        ),
        chart(
            "chart-client-epsilon",
            plots.draw_client_epsilon,
            rows,
            "each client's epsilon after each round (it only grows: every round and every release is composed)."
            + (" Every client spent exactly the same, so the lines lie on top of each other." if _alike(rows) else ""),
        ),
    ]
    missing = training.missing_by_reason(rows)
    if missing:
        listed = table(
            ["kind", "reason", "clients", "rounds", "client-rounds"],
            [
                [
                    badge(m.kind, "warn" if m.kind == "failed" else ""),
                    esc(m.reason),
                    esc(", ".join(m.clients)),
                    esc(training.rounds_ranges(m.rounds)),
                    str(m.count),
                ]
                for m in missing
            ],
            numeric={4},
        )
    else:
        listed = "<p>Every client sent a usable update in every round: no refusals, no failures.</p>"
    timing = training.timing(rows)
    typical = (
        f", a typical later round {timing.median_after_first:.1f} s" if timing.median_after_first is not None else ""
    )
    participation = [
        chart(
            "chart-participation",
            plots.draw_participation,
            rows,
            "clients per round: usable updates, refusals and failures.",
        ),
        chart("chart-seconds", plots.draw_seconds, rows, "wall-clock seconds of each round."),
    ]
    return (
        '<section id="training"><h2>Training</h2>'
        f'<div class="charts">{"".join(charts)}</div>'
        '<div id="refusals"><h3>Refusals and failures</h3>'
        "<p>A client refuses a round that would break its own privacy policy or budget; a failure is an error, "
        "reported as a category only.</p>" + listed + "</div>"
        '<div id="timing"><h3>Time per round</h3>'
        f"<p>{timing.total:.1f} s in all; the first round {timing.first:.1f} s (it includes starting the clients)"
        f"{typical}; the slowest was round {timing.slowest_round}.</p></div>"
        f'<div class="charts">{"".join(participation)}</div>' + _rounds_table(rows) + "</section>"
    )


def _alike(rows: list[dict[str, Any]]) -> bool:
    """Every client has the same epsilon in every round (their lines coincide)."""
    return len(plots.clients(rows)) > 1 and all(len(set((row.get("epsilon") or {}).values())) <= 1 for row in rows)


def _rounds_table(rows: list[dict[str, Any]]) -> str:
    metric = plots.headline(rows)
    head = [
        "round",
        metric,
        "loss",
        f"federated {metric}",
        "federated loss",
        "train loss",
        "ok",
        "refused",
        "failed",
        "max epsilon",
        "client-level epsilon",
        "seconds",
    ]
    body = [
        [
            str(r["round"]),
            num(r.get("accuracy"), 4),
            num(r.get("loss"), 4),
            num(r.get("federated_accuracy"), 4),
            num(r.get("federated_loss"), 4),
            num(r.get("train_loss"), 4),
            num(r.get("clients_ok")),
            num(r.get("clients_refused")),
            num(r.get("clients_failed")),
            num(r.get("epsilon_max")),
            num(r.get("client_epsilon")),
            num(r.get("seconds"), 2),
        ]
        for r in rows
    ]
    return (
        '<details id="rounds"><summary>Every round (metrics.json)</summary>'
        + table(head, body, numeric=set(range(len(head))))
        + "</details>"
    )


def run_section(files: RunFiles) -> str:
    config = "".join(
        "<div>"
        + table([f"[{esc(section)}]", "value"], [[f"<code>{esc(k)}</code>", esc(_toml(v))] for k, v in values.items()])
        + "</div>"
        for section, values in files.config.items()
    )
    recorded = {"fedtrain": files.info.get("fedtrain_version", "?"), **(files.info.get("versions") or {})}
    versions = [[esc(name), esc(recorded.get(name, "not recorded")), esc(_version(name))] for name in VERSIONED]
    versions.append(["python", esc(recorded.get("python", "not recorded")), esc(platform.python_version())])
    fingerprints = [
        [f"<code>{esc(name)}</code>", f'<span class="hash">{esc(digest)}</span>']
        for name, digest in files.fingerprints.items()
    ]
    states = [[f"<code>{esc(name)}</code>", badge(state)] for name, state in files.states.items()]
    states += [
        [f"<code>{esc(name)}</code>", badge("not covered", "off")] for name in NOT_COVERED if name in files.fingerprints
    ]
    return (
        '<section id="run"><h2>The run</h2>'
        f'<div id="configuration"><h3>Configuration</h3><p class="note">config.toml as the run resolved it '
        f"(no secrets: the model key is named by its file, never included).</p>"
        f'<div class="config">{config}</div></div>'
        '<div id="versions"><h3>Versions</h3>'
        + table(["package", "that ran the training", "that wrote this report"], versions)
        + "</div>"
        '<div id="key"><h3>Model key</h3>'
        f'<p>key id <code id="key-id">{esc(files.info.get("key_id", "?"))}</code>: a fingerprint of the key '
        "(a domain-separated SHA-256), which reveals nothing about the key. The key itself is never in the run "
        "directory nor in this report; whoever holds it can open the model (<code>fedtrain export</code>) and "
        "verify the reports (<code>fedtrain verify</code>).</p></div>"
        '<div id="fingerprints"><h3>Fingerprints of the run\'s files (SHA-256)</h3>'
        '<p class="note">To check that a file you hold is the one this report describes, compare its SHA-256 '
        "(<code>sha256sum model.ftenc</code>) with this list. The model files are encrypted; their fingerprints "
        "are of the encrypted bytes.</p>" + table(["file", "SHA-256"], fingerprints) + "</div>"
        '<div id="integrity"><h3>Integrity</h3>'
        + table(["file", "state"], states)
        + '<p class="note">config.toml and run.json are not covered by the integrity record; the record\'s MAC binds '
        "the run id and key id that run.json holds.</p></div></section>"
    )


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def render(files: RunFiles) -> str:
    """The whole report for a verified run, as one HTML document.

    Args:
        files: the run's verified files (run_files.load_verified_run).

    Returns:
        The HTML text (UTF-8 when written).
    """
    generated = time.strftime("%Y-%m-%d %H:%M:%S %z")
    body = (
        header(files, generated) + summary(files) + privacy_card(files) + training_section(files) + run_section(files)
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>fedtrain report: {esc(files.name)}</title><style>{STYLE}</style></head>"
        f"<body><main>{body}<footer>Written by <code>fedtrain report</code> from the run's files after verifying "
        "them; one file, no scripts, nothing loaded from anywhere.</footer></main></body></html>\n"
    )
