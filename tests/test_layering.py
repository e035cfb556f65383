"""The architecture's two rules that code review alone would let slip (issue 15, acceptance 1):
server and clients never import each other, and the names of the records they exchange are written
only in protocol.py."""

from __future__ import annotations

import ast
from pathlib import Path

from fedtrain import protocol

PACKAGE = Path(protocol.__file__).parent
# Names distinctive enough that a literal elsewhere can only be a record name written twice
# ("arrays", "metrics", "config"... are ordinary words too and are left out).
RECORD_NAMES = {
    value
    for name, value in vars(protocol).items()
    if name.isupper() and isinstance(value, str) and "-" in value and not value.startswith("-")
}


def _modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_server_and_clients_never_import_each_other() -> None:
    for folder, other in (("server", "fedtrain.clients"), ("clients", "fedtrain.server")):
        for path in _modules(folder):
            wrong = sorted(m for m in _imports(path) if m == other or m.startswith(other + "."))
            assert not wrong, f"{path.relative_to(PACKAGE)} imports {wrong}"


def test_record_names_are_written_only_in_protocol() -> None:
    assert {"fedtrain-run", "num-examples", "train-loss", "client-id", "refusal-kind"} <= RECORD_NAMES
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "protocol.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not literals & RECORD_NAMES, f"{path.relative_to(PACKAGE)} spells {sorted(literals & RECORD_NAMES)}"
