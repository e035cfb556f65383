"""Private data: shards read lazily (datasets.py), the files they come from (formats.py), per-sample
transforms (transforms.py), and how a simulation splits one dataset into shards (partition.py)."""

from fedtrain.data.datasets import (
    ArrayDataset,
    CsvDataset,
    Dataset,
    ImageFolderDataset,
    Subset,
    TorchDataset,
    Transformed,
)
from fedtrain.data.formats import (
    BUILTIN,
    check_client_shard,
    encode_labels,
    encode_targets,
    load_builtin,
    load_shard,
    load_source,
)

__all__ = [
    "BUILTIN",
    "ArrayDataset",
    "CsvDataset",
    "Dataset",
    "ImageFolderDataset",
    "Subset",
    "TorchDataset",
    "Transformed",
    "check_client_shard",
    "encode_labels",
    "encode_targets",
    "load_builtin",
    "load_shard",
    "load_source",
]
