"""The `fedtrain` command line. Errors a user can cause print one sentence and exit non-zero."""

from __future__ import annotations

import inspect
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape

from fedtrain.errors import FedtrainError, find_fedtrain_error
from fedtrain.run_report import earlier_rows, fmt, print_audit, print_failures, print_summary, round_table

if TYPE_CHECKING:
    from fedtrain.config import Config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Federated, privacy-preserving PyTorch training (Flower + Opacus DP-SGD + encrypted weights).",
)
console = Console()
errors = Console(stderr=True)

EXIT_USER_ERROR = 2
# "\\[" keeps rich's help formatter from reading [track] as markup
TRACK_HELP = "Also log every round to mlflow or tensorboard (repeat for both; pip install 'fedtrain\\[track]')."
MLFLOW_URI_HELP = "MLflow's store: a folder (default ./mlruns) or an MLflow tracking URI."
EXIT_BROKEN_GUARANTEE = 3  # fedtrain audit: the lower bound on epsilon is above the accounted epsilon


def _new_run_dir(run_dir: str | None) -> Path:
    path = Path(run_dir) if run_dir else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if path.exists() and any(path.iterdir()):
        raise FedtrainError(f"run directory {path} is not empty; choose a new --run-dir so no earlier run is lost.")
    return path


@app.command()
def simulate(
    data: Annotated[str | None, typer.Option(help="Dataset file/folder to split into shards, or 'digits'.")] = None,
    clients: Annotated[int | None, typer.Option(help="Number of simulated clients.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    partition: Annotated[str | None, typer.Option(help="iid or dirichlet.")] = None,
    alpha: Annotated[float | None, typer.Option(help="Dirichlet concentration (smaller = more skew).")] = None,
    model: Annotated[str | None, typer.Option(help="logistic, mlp, cnn, or MODULE:FACTORY.")] = None,
    target_epsilon: Annotated[float | None, typer.Option(help="Epsilon for the whole training.")] = None,
    noise_multiplier: Annotated[float | None, typer.Option(help="Fixed DP-SGD noise multiplier.")] = None,
    max_grad_norm: Annotated[
        float | None, typer.Option(help="Per-sample gradient clipping bound (default: by rule, docs/privacy.md).")
    ] = None,
    delta: Annotated[float | None, typer.Option(help="DP delta (default min(1e-5, 1/(10 N))).")] = None,
    max_epsilon: Annotated[float | None, typer.Option(help="Budget a client never exceeds.")] = None,
    accountant: Annotated[str | None, typer.Option(help="prv (tight, default) or rdp.")] = None,
    lr: Annotated[float | None, typer.Option(help="Local learning rate (default: each client's, by rule).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Expected local batch size (default: each client's, by rule).")
    ] = None,
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs per round (default: by rule).")] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="fedavg, fedprox, fedadam, fedyogi, fedadagrad, fedavgm, krum, multikrum, "
            "bulyan, median or trimmed-mean (docs/strategies.md)."
        ),
    ] = None,
    max_update_norm: Annotated[
        float | None, typer.Option(help="Reject client updates whose L2 norm is larger.")
    ] = None,
    central_dp: Annotated[
        str | None, typer.Option(help="Client-level DP on the server: off, fixed or adaptive clipping.")
    ] = None,
    central_noise_multiplier: Annotated[float | None, typer.Option(help="Client-level DP noise multiplier.")] = None,
    central_clipping_norm: Annotated[
        float | None, typer.Option(help="Client-level DP update bound (adaptive: its start).")
    ] = None,
    max_client_epsilon: Annotated[
        float | None, typer.Option(help="Refuse a run whose client-level epsilon would exceed this.")
    ] = None,
    secure_aggregation: Annotated[
        bool | None,
        typer.Option("--secure-aggregation", help="SecAgg+: the server learns only the sum of the updates."),
    ] = None,
    compression: Annotated[
        str | None, typer.Option(help="Updates sent as none, int8, int4 or topk (after DP: no privacy cost).")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML file with any of these options.")] = None,
    run_dir: Annotated[str | None, typer.Option(help="Where to keep the run (default runs/<time>).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for splits and the initial model.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    key_file: Annotated[str | None, typer.Option(help="Model key file (default: fedtrain's key store).")] = None,
    payload_encryption: Annotated[
        bool | None, typer.Option("--payload-encryption", help="Encrypt every message end to end, as deployments do.")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the run in this directory after its last complete round (its own config)."),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(help="private (Gaussian mechanism, on the ledger), none, or plain (outside the guarantee)."),
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="A client privacy policy (TOML) every simulated client applies.")
    ] = None,
    track: Annotated[list[str] | None, typer.Option(help=TRACK_HELP)] = None,
    mlflow_uri: Annotated[str | None, typer.Option(help=MLFLOW_URI_HELP)] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's own log lines.")] = False,
) -> None:
    """Train on Flower's Simulation Engine: the dataset split into N private shards, DP-SGD on each."""
    overrides = {k: v for k, v in locals().items() if k not in ("config", "verbose", "resume", "policy")}
    from fedtrain import api
    from fedtrain.config import resolve
    from fedtrain.privacy.policy import ClientPolicy

    if resume is not None:
        config, overrides["run_dir"] = _resumed_config(resume, config, run_dir), str(resume)
    resolved = resolve(config, overrides)
    client_policy = ClientPolicy.load(policy) if policy is not None else None
    rows: list[dict[str, Any]] = earlier_rows(resume) if resume is not None else []

    def run(on_round: RoundCallback, announce: Callable[[str], None]) -> Path:
        result = api.run(resolved, policy=client_policy, on_round=on_round, verbose=verbose,
                         resume=resume is not None, announce=announce)  # fmt: skip
        return result.run_dir

    print_summary(console, _with_round_table(resolved, rows, run), rows)


RoundCallback = Callable[[dict[str, Any]], None]


def _with_round_table(resolved: Config, rows: list[dict[str, Any]],
                      run: Callable[[RoundCallback, Callable[[str], None]], Path]) -> Path:  # fmt: skip
    """Run a simulation with its live table of rounds; on failure, the rounds' failures before the error."""
    client_level = resolved.privacy.central_dp != "off"
    live = Live(round_table(rows, resolved.federation.rounds, client_level), console=console, refresh_per_second=4)

    def announce(text: str) -> None:  # where the key and the run are: said before the table starts
        console.print(text, highlight=False)
        if text.startswith("run directory"):
            live.start()

    def on_round(row: dict[str, Any]) -> None:
        rows.append(row)
        live.update(round_table(rows, resolved.federation.rounds, client_level))

    try:
        run_dir = run(on_round, announce)
    except FedtrainError:
        live.stop()
        print_failures(console, rows)  # what went wrong in which round, before the sentence that stops the run
        raise
    live.stop()
    console.print()
    return run_dir


def audit(**options: Any) -> None:
    """Audit a simulated run: canaries in one client's data bound epsilon from below, beside the accounted one.

    Takes every option of `simulate` but --resume. Exits 3, with one sentence, when the lower bound is above
    the accounted epsilon: the privacy guarantee is broken."""
    from fedtrain.audit import audit as run_audit
    from fedtrain.config import resolve
    from fedtrain.privacy.policy import ClientPolicy

    kind, m, confidence = options.pop("canary_kind"), options.pop("canaries"), options.pop("confidence")
    positive_control, verbose = options.pop("positive_control"), options.pop("verbose")
    config, policy = options.pop("config"), options.pop("policy")
    resolved = resolve(config, options)
    client_policy = ClientPolicy.load(policy) if policy is not None else None
    if positive_control:
        console.print("[bold yellow]POSITIVE CONTROL:[/] client-0 trains WITHOUT noise while its ledger records it; "
                      "this run's model is not private, and the audit must catch it.")  # fmt: skip
    rows: list[dict[str, Any]] = []
    found: list[Any] = []

    def run(on_round: RoundCallback, announce: Callable[[str], None]) -> Path:
        found.append(run_audit(resolved, kind=kind, canaries=m, confidence=confidence,
                               positive_control=positive_control, policy=client_policy, on_round=on_round,
                               verbose=verbose, announce=announce))  # fmt: skip
        return found[0].run_dir

    print_summary(console, _with_round_table(resolved, rows, run), rows)
    print_audit(console, found[0])
    if found[0].broken:
        errors.print(f"[bold red]error:[/] {found[0].verdict()}.", highlight=False, soft_wrap=True)
        sys.exit(EXIT_BROKEN_GUARANTEE)


def _audit_options(
    canaries: Annotated[
        int | None, typer.Option(help="Canaries in client-0's data (default 1000, at most the model's values).")
    ] = None,
    canary_kind: Annotated[
        str, typer.Option(help="gradient (white-box: the updates client-0 sends) or input (black-box: the model).")
    ] = "gradient",
    confidence: Annotated[float, typer.Option(help="Confidence of the lower bound.")] = 0.95,
    positive_control: Annotated[
        bool,
        typer.Option("--positive-control", help="The audit's control: client-0 trains without noise (not private)."),
    ] = False,
) -> None:
    """The options `audit` adds to `simulate`'s."""


def _audit_signature() -> inspect.Signature:
    """simulate's options (but --resume) and the audit's own: one list of options to keep, not two."""
    shared = [p for name, p in inspect.signature(simulate, eval_str=True).parameters.items() if name != "resume"]
    own = list(inspect.signature(_audit_options, eval_str=True).parameters.values())
    return inspect.Signature([*shared, *own])


audit.__signature__ = _audit_signature()  # type: ignore[attr-defined]
audit.__annotations__ = {p.name: p.annotation for p in audit.__signature__.parameters.values()}  # type: ignore[attr-defined]
app.command(name="audit")(audit)


@app.command()
def tune(
    data: Annotated[str | None, typer.Option(help="Dataset file/folder to split into shards, or 'digits'.")] = None,
    clients: Annotated[int | None, typer.Option(help="Number of simulated clients.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds of each trial.")] = None,
    partition: Annotated[str | None, typer.Option(help="iid or dirichlet.")] = None,
    alpha: Annotated[float | None, typer.Option(help="Dirichlet concentration (smaller = more skew).")] = None,
    model: Annotated[str | None, typer.Option(help="logistic, mlp, cnn, or MODULE:FACTORY.")] = None,
    target_epsilon: Annotated[float | None, typer.Option(help="Epsilon of the whole tuning and training.")] = None,
    delta: Annotated[float | None, typer.Option(help="DP delta (default min(1e-5, 1/(10 N))).")] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Centre of the learning rates searched (x1/4 to x4; default: each client's rule)."),
    ] = None,
    max_grad_norm: Annotated[
        float | None, typer.Option(help="Centre of the clipping bounds searched (x1/2 to x2; default: the rule's).")
    ] = None,
    lr_values: Annotated[str | None, typer.Option(help="Learning rates to search, comma-separated.")] = None,
    clip_values: Annotated[str | None, typer.Option(help="Clipping bounds to search, comma-separated.")] = None,
    expected_trials: Annotated[float, typer.Option(help="Mean of the random number of trials.")] = 8.0,
    eta: Annotated[float, typer.Option(help="Shape of the trial count: 0 logarithmic (cheapest), 1 geometric.")] = 0.0,
    batch_size: Annotated[int | None, typer.Option(help="Expected local batch size.")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs per round.")] = None,
    strategy: Annotated[str | None, typer.Option(help="Aggregation strategy (docs/strategies.md).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML file with any of these options.")] = None,
    run_dir: Annotated[str | None, typer.Option(help="Where to keep the chosen run (default runs/<time>).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for splits and the initial model.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    key_file: Annotated[str | None, typer.Option(help="Model key file (default: fedtrain's key store).")] = None,
    policy: Annotated[
        Path | None, typer.Option(help="A client privacy policy (TOML) every simulated client applies.")
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's own log lines.")] = False,
) -> None:
    """Tune the learning rate and clipping bound privately: the best of a secret, random number of
    simulated trials, its price (Papernot and Steinke) on every client's ledger."""
    given = dict(locals())
    skip = ("config", "verbose", "policy", "lr_values", "clip_values", "expected_trials", "eta")
    overrides = {k: v for k, v in given.items() if k not in skip}
    from fedtrain.config import resolve
    from fedtrain.privacy.policy import ClientPolicy
    from fedtrain.tuning import SearchSpace
    from fedtrain.tuning import tune as run_tuning

    resolved = resolve(config, overrides)
    around = SearchSpace.around(resolved)
    space = SearchSpace(
        _numbers(lr_values, "--lr-values") if lr_values else around.lr,
        _numbers(clip_values, "--clip-values") if clip_values else around.max_grad_norm,
        # values given on the command line are used as given; the others scale each client's rule
        tuple(
            n for n, given in (("lr", lr_values), ("max_grad_norm", clip_values)) if n in around.scaled and not given
        ),
    )
    client_policy = ClientPolicy.load(policy) if policy is not None else None
    started = time.monotonic()
    result = run_tuning(resolved, expected_trials=expected_trials, eta=eta, space=space, policy=client_policy,
                        announce=lambda text: console.print(text, highlight=False))  # fmt: skip
    console.print(f"tuned in {time.monotonic() - started:.0f} s")
    print_summary(console, result.run_dir, result.history)


def _numbers(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise FedtrainError(f"{option} takes numbers separated by commas, not {text!r}.") from None


def _resumed_config(resume: Path, config: Path | None, run_dir: str | None) -> Path:
    """The config a resumed run is checked against: its own config.toml unless --config is given."""
    if run_dir is not None:
        raise FedtrainError("give --resume RUN_DIR or --run-dir, not both: a resumed run stays where it is.")
    own = resume / "config.toml"
    if config is None and not own.is_file():
        raise FedtrainError(f"{resume} is not a fedtrain run directory (no config.toml); check the path.")
    return config or own


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by fedtrain.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the plain PyTorch state_dict.")],
    key_file: Annotated[
        str | None, typer.Option(help="Model key file (default: $FEDTRAIN_MODEL_KEY or store).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite --out if it exists.")] = False,
    quantize: Annotated[
        str | None,
        typer.Option(help="int8: 8-bit weights (fedtrain.model_quantization.load_quantized reads them back)."),
    ] = None,
) -> None:
    """Decrypt a run's final model to a plain state_dict file (only when you ask for it)."""
    import torch

    from fedtrain.fileio import atomic_write_bytes
    from fedtrain.security.keys import load_model_key
    from fedtrain.server.model_files import MODEL_FILE, load_model, read_run_info
    from fedtrain.server.verification import require_intact_reports

    if out.exists() and not force:
        raise FedtrainError(f"{out} already exists; choose another --out or pass --force.")
    if quantize is not None:
        _export_quantized(run_dir, out, key_file or _configured_key_file(run_dir), quantize)
        return
    info = read_run_info(run_dir)
    model_key = load_model_key(key_file or _configured_key_file(run_dir))
    state, meta = load_model(run_dir / MODEL_FILE, model_key.key, info["run_id"], "model")
    require_intact_reports(run_dir, model_key)  # edited metrics or privacy report: no export
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(out, buffer.getvalue(), mode=0o600)
    console.print(f"wrote the plain model of round {meta.get('round')} to {out} (mode 600): it is not encrypted.")


def _export_quantized(run_dir: Path, out: Path, key_file: str | None, mode: str) -> None:
    from fedtrain.fileio import atomic_write_bytes
    from fedtrain.server.quantized_export import quantized_export

    made = quantized_export(run_dir, key_file, mode)
    atomic_write_bytes(out, made.data, mode=0o600)
    size = len(made.data)
    console.print(
        f"wrote the {mode} model of round {made.round} to {out} (mode 600): it is not encrypted.\n"
        f"  size: {size:,} bytes, {size / made.full_bytes:.3f} of the float model's {made.full_bytes:,}",
        highlight=False,
    )
    if made.why_no_metric is not None:
        console.print(f"  {made.metric} on the central test split: not available ({made.why_no_metric}).")
    else:
        console.print(
            f"  {made.metric} on the central test split: {made.quantized:.4f} ({mode}), {made.full:.4f} (float)",
            highlight=False,
        )


@app.command()
def verify(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by fedtrain.")],
    key_file: Annotated[
        str | None, typer.Option(help="Model key file (default: the run's own, $FEDTRAIN_MODEL_KEY or store).")
    ] = None,
) -> None:
    """Check that every file of a run is as fedtrain wrote it (metrics, privacy report, plot, model)."""
    from fedtrain.security.keys import load_model_key
    from fedtrain.server.verification import verify_run

    states = verify_run(run_dir, load_model_key(key_file or _configured_key_file(run_dir)))
    for name, state in states.items():
        console.print(f"  {name}: {state}", highlight=False)
    bad = [f"{name} ({state})" for name, state in states.items() if state != "ok"]
    if bad:
        raise FedtrainError(
            f"{len(bad)} of {len(states)} files of {run_dir} are not as fedtrain wrote them: {'; '.join(bad)}."
        )
    console.print(f"all {len(states)} files of {run_dir} are as fedtrain wrote them.")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by fedtrain.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Where to write the HTML page (default: RUN_DIR/report.html).")
    ] = None,
    key_file: Annotated[
        str | None, typer.Option(help="Model key file (default: the run's own, $FEDTRAIN_MODEL_KEY or store).")
    ] = None,
    track: Annotated[
        list[str] | None,
        typer.Option(help="Also log the finished run to mlflow or tensorboard (repeat for both), report attached."),
    ] = None,
    mlflow_uri: Annotated[str | None, typer.Option(help=MLFLOW_URI_HELP)] = None,
) -> None:
    """Write one self-contained HTML page about a run for whoever signs it off: its privacy card in plain
    words, the training, and the run's configuration, versions and fingerprints. The run's files are
    verified first; a run whose reports were edited gets no report."""
    from fedtrain.security.keys import load_model_key
    from fedtrain.server.report import write_report
    from fedtrain.server.tracking import log_finished_run, make_trackers

    trackers = make_trackers(track or [], mlflow_uri)  # a tracker that is not installed: said before anything
    written = write_report(run_dir, load_model_key(key_file or _configured_key_file(run_dir)), out)
    spending = written.files.privacy.get("clients", {})
    worst = max((c["epsilon"] for c in spending.values()), default=None)
    console.print(
        f"wrote {written.path}: the privacy card and report of run {written.files.name} ({len(written.files.rows)} "
        f"rounds, {len(spending)} clients" + (f", epsilon <= {worst:.3f}" if worst is not None else "") + "); "
        "its files were verified first.",
        highlight=False,
        markup=False,
    )
    for line in log_finished_run(trackers, written):
        console.print(line, highlight=False, markup=False)


@app.command(name="rotate-key")
def rotate_key(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by fedtrain.")],
    new_key_file: Annotated[Path, typer.Option(help="The new model key (a new one is created if it does not exist).")],
    key_file: Annotated[
        str | None, typer.Option(help="The run's current key (default: the run's own, $FEDTRAIN_MODEL_KEY or store).")
    ] = None,
) -> None:
    """Re-encrypt a run's model and checkpoint under a new model key."""
    from fedtrain.security.keys import generate_key, load_model_key, write_key_file
    from fedtrain.server.key_rotation import rotate_run_key

    old = load_model_key(key_file or _configured_key_file(run_dir))
    if not new_key_file.exists():
        write_key_file(new_key_file, generate_key())
        console.print(f"created a new model key in {new_key_file} (mode 600)")
    new = load_model_key(str(new_key_file))
    files = rotate_run_key(run_dir, old, new)
    console.print(
        f"re-encrypted {len(files)} files of {run_dir} under key {new.key_id}; keep the old key "
        f"({old.key_id}) until you have opened them with the new one (fedtrain export), then destroy it."
    )


@app.command()
def provision(
    out: Annotated[Path, typer.Option("--out", help="New folder for the kits (one sub-folder per party).")],
    server_host: Annotated[
        list[str], typer.Option("--server-host", help="Host name or IP clients dial (repeat for several).")
    ],
    clients: Annotated[int, typer.Option("--clients", help="Number of client kits.")],
    passphrase_env: Annotated[
        str | None, typer.Option(help="Environment variable holding a passphrase for the private keys.")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="The federation's TOML config: its input_shape and classes go into every kit."),
    ] = None,
) -> None:
    """Write a kit per party: CA, server TLS certificate, client authentication keys, payload keys."""
    import os

    from fedtrain.config import resolve
    from fedtrain.security.kit_data import declared_data
    from fedtrain.security.kits import provision as make_kits

    data = declared_data(resolve(config, {}), str(config)) if config is not None else None

    passphrase = None
    if passphrase_env:
        value = os.environ.get(passphrase_env)
        if not value:
            raise FedtrainError(
                f"environment variable {passphrase_env} is empty or unset; export the passphrase first."
            )
        passphrase = value.encode()
    kits = make_kits(out, server_host, clients, passphrase, data)
    console.print(f"wrote {len(kits)} kits under {out}: " + ", ".join(k.name for k in kits))
    console.print(f"give each party only its own folder; keep {out / 'ca'} offline (it signs server certificates).")


def _warn_insecure(role: str) -> None:
    errors.print(
        f"[bold red]WARNING: --insecure {role}: no TLS and no node authentication. Anyone on the network can "
        "read the traffic metadata and join as a node. Payloads stay end-to-end encrypted, but use this only "
        "for local experiments.[/]",
        highlight=False,
        soft_wrap=True,
    )


def _passphrase(env_name: str | None) -> bytes | None:
    import os

    if not env_name:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise FedtrainError(f"environment variable {env_name} is empty or unset; export the passphrase first.")
    return value.encode()


@app.command()
def server(
    kit: Annotated[Path, typer.Option("--kit", help="The server kit written by `fedtrain provision`.")],
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML config (must describe the model's input).")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    min_clients: Annotated[int, typer.Option(help="Clients that must be online before the run starts.")] = 2,
    host: Annotated[str, typer.Option(help="Interface for the public Fleet port.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Public port (TLS, Fleet API only).")] = 9092,
    run_dir: Annotated[str | None, typer.Option(help="Where to keep the run (default runs/<time>).")] = None,
    wait_timeout: Annotated[float, typer.Option(help="Seconds to wait for min-clients.")] = 600.0,
    database: Annotated[Path | None, typer.Option(help="SuperLink state database file (default: memory).")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS, no node authentication: local tests only.")
    ] = False,
    passphrase_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the passphrase of the kit's private keys.")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the run in this directory after its last complete round (its own config)."),
    ] = None,
    track: Annotated[list[str] | None, typer.Option(help=TRACK_HELP)] = None,
    mlflow_uri: Annotated[str | None, typer.Option(help=MLFLOW_URI_HELP)] = None,
) -> None:
    """Run a federation: SuperLink with TLS and node authentication, then the fedtrain run."""
    from fedtrain.config import resolve
    from fedtrain.server.deployment import ServerOptions, serve
    from fedtrain.server.tracking import make_trackers

    if insecure:
        _warn_insecure("server")
    if resume is not None:
        config, run_dir = _resumed_config(resume, config, run_dir), str(resume)
    resolved = resolve(config, {"rounds": rounds, "run_dir": run_dir, "track": track, "mlflow_uri": mlflow_uri})
    make_trackers(resolved.deployment.track or [])  # a tracker that is not installed: said before anything starts
    path = resume if resume is not None else _new_run_dir(resolved.deployment.run_dir)
    options = ServerOptions(
        kit,
        resolved,
        host,
        port,
        min_clients,
        wait_timeout,
        database=database,
        insecure=insecure,
        passphrase=_passphrase(passphrase_env),
        resume=resume is not None,
        secret_env=(passphrase_env,) if passphrase_env else (),
    )
    rows: list[dict[str, Any]] = []

    def on_round(row: dict[str, Any]) -> None:
        rows.append(row)
        console.print(
            f"round {row['round']}/{resolved.federation.rounds}: accuracy {fmt(row['accuracy'])}, max epsilon "
            f"{fmt(row['epsilon_max'], 3)}, clients ok {row['clients_ok']}, refused {row['clients_refused']}, "
            f"failed {row['clients_failed']}"
            + (f", client-level epsilon {row['client_epsilon']:.3f}" if row.get("client_epsilon") is not None else ""),
            highlight=False,
        )

    try:
        serve(options, path, lambda text: console.print(text, highlight=False), on_round)
    except FedtrainError:
        print_failures(console, rows)
        raise
    if rows:
        print_summary(console, path, rows)


@app.command()
def client(
    kit: Annotated[Path, typer.Option("--kit", help="This client's kit written by `fedtrain provision`.")],
    server_address: Annotated[str, typer.Option("--server", help="HOST:PORT of the fedtrain server.")],
    data: Annotated[Path, typer.Option("--data", help="This client's private shard (file or image folder).")],
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    max_wait: Annotated[float, typer.Option(help="Seconds to keep trying to reach the server.")] = 60.0,
    max_physical_batch_size: Annotated[
        int | None, typer.Option(help="Compute each batch in chunks of at most this many samples (GPU memory).")
    ] = None,
    passphrase_env: Annotated[str | None, typer.Option(help="Variable holding the node key's passphrase.")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS, no node authentication: local tests only.")
    ] = False,
    policy: Annotated[
        Path | None, typer.Option(help="This client's privacy policy (TOML; default: the kit's policy.toml).")
    ] = None,
    processes: Annotated[
        int,
        typer.Option(
            help="Train each round with this many local processes (one per GPU from --device, or CPU with gloo); "
            "the same samples, noise and ledger entry as one process."
        ),
    ] = 1,
) -> None:
    """Join a federation: a SuperNode that trains on the shard at --data and never uploads it.

    Every run the server proposes is checked against this client's own privacy policy, and every
    release is composed into the lifetime ledger of its data (`fedtrain ledger`)."""
    from fedtrain.clients.deployment import ClientOptions, join
    from fedtrain.device import resolve_device

    if insecure:
        _warn_insecure("client")
    if device:
        resolve_device(device)
    if max_physical_batch_size is not None and max_physical_batch_size < 1:
        raise FedtrainError(f"--max-physical-batch-size must be at least 1, not {max_physical_batch_size}.")
    if processes < 1:
        raise FedtrainError(f"--processes must be at least 1, not {processes}.")
    options = ClientOptions(
        kit,
        server_address,
        data,
        device,
        max_wait,
        _passphrase(passphrase_env),
        insecure,
        max_physical_batch_size,
        policy,
        secret_env=(passphrase_env,) if passphrase_env else (),
        processes=processes,
    )
    join(options, lambda text: console.print(text, highlight=False))


@app.command()
def ledger(
    kit: Annotated[Path, typer.Option("--kit", help="This client's kit written by `fedtrain provision`.")],
    data: Annotated[
        Path | None, typer.Option("--data", help="Show only this shard (found by its contents, any format).")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="The policy whose caps to show (default: the kit's policy.toml).")
    ] = None,
) -> None:
    """Show this client's privacy history: every run over its data, and the lifetime epsilon they compose to."""
    from fedtrain.clients.ledger_report import ledger_history
    from fedtrain.privacy.policy import POLICY_FILE, ClientPolicy

    name, shards = ledger_history(kit, data, policy)
    rules = ClientPolicy.load(policy or kit / POLICY_FILE)
    if not shards:
        console.print(f"{name}: nothing spent yet (no run has used this client's data).")
    for shard in shards:
        console.print(
            f"{name}: shard {shard.fingerprint[:16]} ({shard.records} records, first used {shard.first_used}): "
            f"lifetime epsilon {shard.lifetime_epsilon:.3f} at delta {shard.delta:g} "
            f"(cap {rules.max_lifetime_epsilon:g}, {rules.accountant.upper()})",
            highlight=False,
        )
        if shard.overlaps:
            others = ", ".join(other[:16] for other in shard.overlaps)
            console.print(f"  shares records with shard(s) {others}: their runs count here too", highlight=False)
        for run in shard.runs:
            console.print(
                f"  run {run.run} ({run.started}): epsilon {run.epsilon:.3f} at delta {run.delta:g} over "
                f"{run.rounds} rounds and {run.releases} metric releases",
                highlight=False,
            )


def _configured_key_file(run_dir: Path) -> str | None:
    """The key file the run was configured with (its config.toml), if any."""
    from fedtrain.config import load_toml

    try:
        value = load_toml(run_dir / "config.toml").get("key_file")
    except FedtrainError:
        return None
    return value if isinstance(value, str) else None


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so every `finally` (child processes!) runs."""


_TERMINATED: list[bool] = []


def _on_sigterm(signum: int, frame: object) -> None:
    _TERMINATED.append(True)  # click may re-wrap the exception; the flag survives
    raise Terminated()


def main() -> None:
    """Console entry point: one sentence for user errors, a traceback only for real bugs."""
    import signal

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except (KeyboardInterrupt, SystemExit) as exc:  # typer turns Ctrl-C into SystemExit(130)
        if _TERMINATED:
            errors.print("stopped (SIGTERM); child processes stopped, files written so far are complete.")
            sys.exit(143)
        if isinstance(exc, KeyboardInterrupt) or exc.code == 130:
            errors.print("interrupted; child processes stopped, files written so far are complete.")
            sys.exit(130)
        raise
    except Exception as exc:
        user_error = find_fedtrain_error(exc)
        if user_error is None:
            raise
        errors.print(f"[bold red]error:[/] {escape(str(user_error))}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_USER_ERROR)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
