"""Where a ClientApp finds this client's name, its privacy policy and its lifetime ledger.

- A real node (`fedtrain client`): its kit. The policy is the file `fedtrain client` names in the
  node config (`--policy FILE`, or the kit's policy.toml); the ledger is sealed under the kit's
  `ledger.key` in $FEDTRAIN_HOME/ledgers/<client>/, anchored by the kit's `ledger.anchor`.
- A simulated node (`fedtrain simulate`): the policy given with --policy, else one admitting the
  run's own settings; the ledger is sealed under the run's model key in RUN_DIR/ledgers/<client>/.
- A node of an in-process test: the same policy rule, and a ledger kept in memory.
Nothing here comes from the server's messages or config: the server cannot choose any of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context

from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.privacy.policy import POLICY_FILE, ClientPolicy
from fedtrain.security.keys import fedtrain_home, read_key_file
from fedtrain.security.kits import read_kit

if TYPE_CHECKING:  # the ledger needs Opacus (and torch): imported only by messages that train or evaluate
    from fedtrain.components import Components
    from fedtrain.privacy.lifetime import LedgerStore

LEDGER_KEY_FILE = "ledger.key"


def client_id(context: Context) -> str:
    """A stable, human-readable name for this client in metrics and privacy reports."""
    node_config = context.node_config
    if "client-name" in node_config:
        return str(node_config["client-name"])
    if "partition-id" in node_config:
        return f"client-{int(node_config['partition-id'])}"
    return f"node-{context.node_id}"


def kit_store(kit: Path, name: str) -> LedgerStore:
    """A real client's lifetime ledger: sealed with its kit's ledger key, anchored in its kit.

    Raises:
        FedtrainError: when the kit has no ledger key (kits from before lifetime ledgers).
    """
    from fedtrain.privacy.lifetime import ANCHOR_FILE, LedgerStore

    key_path = kit / LEDGER_KEY_FILE
    if not key_path.exists():
        raise FedtrainError(
            f"the kit {kit} has no {LEDGER_KEY_FILE} (it predates lifetime privacy ledgers); provision a new kit."
        )
    return LedgerStore(name, fedtrain_home() / "ledgers" / name, read_key_file(key_path), kit / ANCHOR_FILE)


@dataclass
class ClientSetup:
    """How a ClientApp built for one engine finds a node's policy and ledger.

    Args:
        policy: a fixed policy for every node (simulation's --policy, tests); None: the kit's, or in
            simulation one admitting the run's own settings.
        ledger_key: a simulation's model key: ledgers sealed under RUN_DIR/ledgers. None and no kit:
            ledgers in memory (in-process tests).
        components: the model factory, task and dataset given as Python objects (simulation only).
        ledger_dir: where a simulation's sealed ledgers live, if not RUN_DIR/ledgers (a tuning's
            trials share their tuning's ledgers).
    """

    policy: ClientPolicy | None = None
    ledger_key: bytes | None = None
    ledger_dir: Path | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    components: Components | None = None  # Python objects in place of names (fedtrain.simulate)

    def policy_for(self, context: Context, config: Config) -> ClientPolicy:
        node_config = context.node_config
        if "policy" in node_config:
            return ClientPolicy.load(str(node_config["policy"]))
        if "kit" in node_config:
            return ClientPolicy.load(Path(str(node_config["kit"])) / POLICY_FILE)
        return self.policy if self.policy is not None else ClientPolicy.admitting(config)

    def store_for(self, context: Context, config: Config) -> LedgerStore:
        from fedtrain.privacy.lifetime import LedgerStore

        name = client_id(context)
        if "kit" in context.node_config:
            kit = Path(str(context.node_config["kit"]))
            read_kit(kit, "client")
            return kit_store(kit, name)
        if self.ledger_key is not None and (self.ledger_dir or config.deployment.run_dir):
            folder = self.ledger_dir or Path(str(config.deployment.run_dir)) / "ledgers"
            return LedgerStore(name, folder / name, self.ledger_key)
        return LedgerStore(name, memory=self.memory)
