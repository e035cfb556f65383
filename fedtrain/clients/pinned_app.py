"""A fedtrain client executes fedtrain's installed ClientApp and nothing else.

Flower's SuperExec starts `flwr-clientapp` for each task; that process unpacks the run's FAB onto
disk and sys.path and imports whatever component the FAB names, so whoever controls the SuperLink
could run code on every client. A fedtrain client therefore runs the SuperNode with
`--isolation process` and its own SuperExec (`python -m fedtrain.clients.pinned_app`), which:

- launches only ClientApp tasks (a run may ask for an agent app, which is refused), and
- launches them with `fedtrain-clientapp` instead of `flwr-clientapp`: the same Flower runtime,
  except that the FAB is checked in memory (it must hold nothing but a pyproject.toml whose
  components are fedtrain's own), nothing of it is written or imported, and the ClientApp comes
  from the installed fedtrain package. A refused run gets an error reply, so the server's round
  goes on without this client.

The hooks replace names inside flwr 1.42's modules (pinned in pyproject.toml);
tests/test_pinned_app.py fails if a Flower upgrade moves them.
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CLIENT_APP_REF = "fedtrain.clients.app:app"
SERVER_APP_REF = "fedtrain.server.app:app"
# What a fedtrain FAB holds: the server's generated pyproject.toml and Flower's hash manifest.
ALLOWED_FAB_FILES = {"pyproject.toml", ".info/CONTENT"}


class UntrustedRunError(Exception):
    """The run asks this client to execute something other than fedtrain's installed ClientApp."""


def check_fab(content: bytes) -> None:
    """Accept only a code-free FAB whose components are fedtrain's own; raise UntrustedRunError otherwise."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
        names = set(archive.namelist())
        extra = sorted(names - ALLOWED_FAB_FILES)
        if extra:
            raise UntrustedRunError(
                f"the run ships files ({', '.join(extra[:5])}); a fedtrain client only runs fedtrain's installed code"
            )
        config = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError, OSError, ValueError) as exc:
        raise UntrustedRunError(f"the run's app bundle is not a fedtrain run ({type(exc).__name__})") from None
    components = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components")
    if components != {"serverapp": SERVER_APP_REF, "clientapp": CLIENT_APP_REF}:
        raise UntrustedRunError(f"the run names components {components!r}, not fedtrain's ClientApp")


def _check_instead_of_install(fab_content: bytes, *_args: object, **_kwargs: object) -> Path:
    check_fab(fab_content)
    return Path()  # nothing installed: the ClientApp comes from the fedtrain package


def _load_fedtrain_client_app(*_args: object, **_kwargs: object):
    def load(*_ids: str):
        from fedtrain.clients.app import app

        return app

    return load


def clientapp_main() -> None:
    """`fedtrain-clientapp`: Flower's ClientApp process with the FAB checked and fedtrain's app pinned."""
    from fedtrain import _flower

    _flower.pin_clientapp(_check_instead_of_install, _load_fedtrain_client_app)
    _flower.run_clientapp_process()


def superexec_main() -> None:
    """Flower's SuperExec, restricted to ClientApp tasks run by `fedtrain-clientapp`."""
    from fedtrain import _flower

    launcher = Path(sys.executable).with_name("fedtrain-clientapp")
    if not launcher.exists():
        sys.exit(f"{launcher} is missing; reinstall fedtrain.")
    _flower.restrict_superexec(launcher)
    _flower.run_superexec()


if __name__ == "__main__":
    superexec_main()
