"""`fedtrain provision`: one kit folder per party, in the spirit of NVFlare's startup kits.

    KITS/ca/             ca.crt, ca.key            (keep offline: signs server certificates)
    KITS/server/         kit.json, ca.crt, server.crt, server.key, model.key, federation.key,
                         clients/<name>.pub (SuperNode auth keys to register), clients/<name>.uplink.key
    KITS/<client name>/  kit.json, ca.crt, node.key, node.pub, federation.key, uplink.key,
                         policy.toml (the client's privacy policy: defaults, to edit),
                         ledger.key (seals its lifetime privacy ledger: only the client has it),
                         ledger.anchor (the ledger's last update counter, 0: detects a lost ledger)

Payload keys: `federation.key` seals what the server sends down (every client may read the global
model); each client's `uplink.key` seals its updates, so no client can read or forge another's.
The whole tree is built in a temporary folder beside KITS and renamed into place at the end, so a
failure leaves nothing half-written. Secret files are 0600, folders 0700.
With `--config`, the server's and every client's kit also hold federation.toml (security/kit_data.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import fedtrain
from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.fileio import atomic_write_bytes, atomic_write_text
from fedtrain.security import pki
from fedtrain.security.keys import encode_key, generate_key
from fedtrain.security.kit_data import write_data_file

KIT_FILE = "kit.json"
SECRET, PUBLIC = 0o600, 0o644


def _client_names(count: int) -> list[str]:
    if count < 1:
        raise FedtrainError(f"--clients must be at least 1, not {count}.")
    return [f"client-{i}" for i in range(1, count + 1)]


def _write(folder: Path, name: str, data: bytes | str, mode: int) -> None:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    raw = data.encode() if isinstance(data, str) else data
    atomic_write_bytes(folder / name, raw, mode=mode)


def provision(
    out: Path, server_hosts: list[str], clients: int, passphrase: bytes | None = None, data: Config | None = None
) -> list[Path]:
    """Create every kit under `out` (which must not exist or be empty); returns the kit folders.

    `data` (kit_data.declared_data) goes into every kit as federation.toml, for clients to check their shard."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FedtrainError(f"{out} is not empty; provision into a new folder so no existing key is overwritten.")
    names = _client_names(clients)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _build(staging, server_hosts, names, passphrase)
        if data is not None:
            for folder in [staging / "server", *(staging / n for n in names)]:
                write_data_file(folder, data)
        if out.exists():
            out.rmdir()
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.chmod(out, 0o700)
    return [out / "server", *(out / n for n in names)]


def _build(root: Path, hosts: list[str], names: list[str], passphrase: bytes | None) -> None:
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    ca_key, ca_cert = pki.make_ca()
    server_key, server_cert = pki.make_server_cert(ca_key, ca_cert, hosts)
    ca_pem = pki.cert_pem(ca_cert)
    federation_key = encode_key(generate_key()) + "\n"

    _write(root / "ca", "ca.crt", ca_pem, PUBLIC)
    _write(root / "ca", "ca.key", pki.private_pem(ca_key, passphrase), SECRET)

    server = root / "server"
    _write(server, "ca.crt", ca_pem, PUBLIC)
    _write(server, "server.crt", pki.cert_pem(server_cert), PUBLIC)
    _write(server, "server.key", pki.private_pem(server_key, passphrase), SECRET)
    _write(server, "model.key", encode_key(generate_key()) + "\n", SECRET)
    _write(server, "federation.key", federation_key, SECRET)
    for name in names:
        node_key = pki.new_key()
        uplink_key = encode_key(generate_key()) + "\n"
        client = root / name
        _write(client, "ca.crt", ca_pem, PUBLIC)
        # OpenSSH is what flower-supernode reads; it cannot read an encrypted key, so a passphrase-protected
        # node key is PKCS#8 PEM and `fedtrain client` hands Flower a decrypted copy in a private temp folder.
        node_pem = pki.private_pem(node_key, passphrase) if passphrase else pki.private_openssh(node_key)
        _write(client, "node.key", node_pem, SECRET)
        _write(client, "node.pub", pki.public_openssh(node_key) + b"\n", PUBLIC)
        _write(client, "federation.key", federation_key, SECRET)
        _write(client, "uplink.key", uplink_key, SECRET)
        _privacy_files(client, name)
        _write(server / "clients", f"{name}.pub", pki.public_openssh(node_key) + b"\n", PUBLIC)
        _write(server / "clients", f"{name}.uplink.key", uplink_key, SECRET)
        _kit_info(client, {"role": "client", "name": name, "server_hosts": hosts, "created": created}, passphrase)
    server_info = {"role": "server", "name": "server", "server_hosts": hosts, "clients": names, "created": created}
    _kit_info(server, server_info, passphrase)


def _privacy_files(client: Path, name: str) -> None:
    """The client's own privacy policy (defaults, editable) and its lifetime ledger's key and anchor."""
    from fedtrain.privacy.lifetime import ANCHOR_FILE, write_anchor
    from fedtrain.privacy.policy import POLICY_FILE, ClientPolicy

    ledger_key = generate_key()
    _write(client, "ledger.key", encode_key(ledger_key) + "\n", SECRET)
    write_anchor(client / ANCHOR_FILE, ledger_key, name, 0)
    _write(client, POLICY_FILE, ClientPolicy().to_toml(), SECRET)


def _kit_info(folder: Path, info: dict, passphrase: bytes | None) -> None:
    info = {**info, "fedtrain_version": fedtrain.__version__, "private_keys_encrypted": bool(passphrase)}
    atomic_write_text(folder / KIT_FILE, json.dumps(info, indent=2) + "\n", mode=PUBLIC)


def read_kit(folder: Path, role: str) -> dict:
    """A kit's description; a missing, damaged or wrong-role kit is a clear error."""
    path = Path(folder) / KIT_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedtrainError(
            f"{folder} is not a fedtrain kit (no {KIT_FILE}); give the folder `fedtrain provision` wrote."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedtrainError(f"{path} is damaged ({exc}); provision the kit again.") from None
    if not isinstance(info, dict) or info.get("role") != role:
        raise FedtrainError(
            f"{folder} is a {info.get('role') if isinstance(info, dict) else 'unknown'} kit, not a {role} kit."
        )
    return info
