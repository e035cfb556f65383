"""The federation's data description, carried in every kit as `federation.toml`.

A client cannot ask the server anything before it connects, so what the server's model takes
(input shape, classes, the CSV label column) travels in the kit: `fedtrain provision --config
fed.toml` writes it, `fedtrain client` checks its shard against it before connecting, and
`fedtrain server` refuses a config that contradicts it. A kit without one still works: the client
then checks only what is wrong on its own (data/check_client_shard).
"""

from __future__ import annotations

from pathlib import Path

from fedtrain.config import Config, from_mapping, load_toml, toml_value
from fedtrain.errors import FedtrainError
from fedtrain.fileio import atomic_write_text

DATA_FILE = "federation.toml"
DATA_KEYS = ("input_shape", "labels", "num_classes", "label_column")


def declared_data(config: Config, source: str) -> Config:
    """The part of `config` a kit carries; the model's input and classes must be given.

    Args:
        config: the federation's config (`fedtrain provision --config`).
        source: where it came from, for the message.

    Returns:
        A Config holding only the data description (every other field at its default).

    Raises:
        FedtrainError: input_shape or the classes (num_classes or labels) are missing.
    """
    if not config.data.input_shape or not (config.data.num_classes or config.data.labels):
        raise FedtrainError(
            f"{source} must give input_shape and num_classes (or labels) so that clients can check their "
            "data before connecting; add them."
        )
    return Config(
        input_shape=list(config.data.input_shape),
        labels=list(config.data.labels) if config.data.labels else None,
        num_classes=config.data.num_classes or len(config.data.labels or []),
        label_column=config.data.label_column,
    ).validate()


def write_data_file(folder: Path, data: Config) -> Path:
    """Write `federation.toml` into a kit folder (public: it describes data, holds no secret)."""
    lines = ["# The federation's data: fedtrain client checks its shard against it before connecting."]
    lines += [f"{key} = {toml_value(data.value(key))}" for key in DATA_KEYS if data.value(key) is not None]
    return atomic_write_text(Path(folder) / DATA_FILE, "\n".join(lines) + "\n", mode=0o644)


def read_data_file(folder: Path) -> Config | None:
    """The kit's data description, or None when it has none (provisioned without --config).

    Raises:
        FedtrainError: the file is damaged or holds other keys.
    """
    path = Path(folder) / DATA_FILE
    if not path.exists():
        return None
    values = load_toml(path)
    unknown = sorted(set(values) - set(DATA_KEYS))
    if unknown:
        raise FedtrainError(f"{path} has an unexpected key {unknown[0]!r}; provision the kit again.")
    return declared_data(from_mapping(values, str(path)), str(path))


def agree(config: Config, data: Config, source: str) -> Config:
    """`config` completed with the kit's data description; a contradiction is an error.

    Args:
        config: the server's run config (`fedtrain server --config`).
        data: the server kit's data description, as the clients got it.
        source: the kit file, for the message.

    Returns:
        `config` with input_shape, classes and label column taken from `data` where it gave none.

    Raises:
        FedtrainError: the config declares another input shape, other classes or another label column.
    """
    num_classes = config.data.num_classes or (len(config.data.labels) if config.data.labels else None)
    differs = [
        (key, value, data.value(key))
        for key, value in (
            ("input_shape", config.data.input_shape),
            ("labels", config.data.labels),
            ("num_classes", num_classes),
        )
        if value is not None and data.value(key) is not None and value != data.value(key)
    ]
    if differs:
        key, value, wanted = differs[0]
        raise FedtrainError(
            f"the config's {key} {value} differs from {wanted}, which the clients' kits declare ({source}); "
            "use the config the kits were provisioned with."
        )
    if config.data.label_column != data.data.label_column:
        raise FedtrainError(
            f"the config's label_column {config.data.label_column!r} differs from {data.data.label_column!r}, "
            f"which the clients' kits declare ({source}); use the config the kits were provisioned with."
        )
    return config.replace(
        input_shape=config.data.input_shape or data.data.input_shape,
        labels=config.data.labels or data.data.labels,
        num_classes=num_classes or data.data.num_classes,
    )
