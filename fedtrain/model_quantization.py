"""A smaller model to ship: every floating tensor of a state_dict in 8-bit codes with a float32 scale per
block of values (`fedtrain export --quantize int8`), and back.

The codes are compression.py's int8 layout (symmetric, round to nearest, scale = max |x| / 127 per block
of `block` values of one tensor), so one quantiser serves updates and exported models. Weights are
post-processing of the DP model: quantising them costs no privacy. Integer tensors (counters, indices)
are kept as they are.

File form (no pickle: nothing in it runs code when it is read): MAGIC, a 4-byte little-endian header
length, a JSON header {"format", "block", "quantised": [[name, shape, dtype]...], "kept": [[name, shape,
dtype]...], "order": [...]}, then the packed int8 layout of the quantised tensors, then the kept (integer)
tensors' raw little-endian bytes, in header order.
"""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fedtrain.compression import Compression, decode, packed_size
from fedtrain.errors import FedtrainError

MAGIC = b"FTQ8"
FORMAT = "fedtrain-int8-model-1"
BLOCK = 64  # values per scale: 4 bytes of scale per 64 bytes of codes keeps the file near 0.27 of float32
QUANTIZE_MODES = ("int8",)
_FLOATS = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def quantized_bytes(state: Mapping[str, torch.Tensor], block: int = BLOCK) -> bytes:
    """The file `fedtrain export --quantize int8` writes for `state` (module docstring).

    Args:
        state: a model's state_dict.
        block: values per scale (0: one scale per tensor).

    Returns:
        The file's bytes.

    Raises:
        FedtrainError: a floating tensor that is not finite (no scale can represent it).
    """
    quantised = {name: t for name, t in state.items() if t.is_floating_point()}
    kept = {name: t for name, t in state.items() if not t.is_floating_point()}
    arrays = {}
    for name, tensor in quantised.items():
        values = tensor.detach().cpu().float().numpy()
        if not np.isfinite(values).all():
            raise FedtrainError(f"tensor {name} of the model is not finite; it cannot be quantised.")
        arrays[name] = values
    packed, _ = Compression("int8", block).encode(arrays) if arrays else (np.zeros(0, np.uint8), {})
    raw = [t.detach().cpu().contiguous().numpy() for t in kept.values()]  # 0-d stays 0-d
    header = {
        "format": FORMAT,
        "block": block,
        "quantised": [[name, list(t.shape), str(t.dtype)] for name, t in quantised.items()],
        "kept": [[name, list(a.shape), a.dtype.newbyteorder("<").str] for name, a in zip(kept, raw, strict=True)],
        "order": list(state),
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    body = [a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes() for a in raw]
    return b"".join([MAGIC, struct.pack("<I", len(text)), text, packed.tobytes(), *body])


def dequantize_state(data: bytes) -> OrderedDict[str, torch.Tensor]:
    """The state_dict a quantised model file stands for (each floating tensor its codes times their scale).

    Args:
        data: a file `quantized_bytes` wrote.

    Returns:
        The state_dict, in the original order and dtypes.

    Raises:
        FedtrainError: not fedtrain's quantised model format, or a damaged one.
    """
    try:
        if data[:4] != MAGIC:
            raise ValueError("it does not start as one")
        (length,) = struct.unpack("<I", data[4:8])
        header = json.loads(data[8 : 8 + length])
        if header["format"] != FORMAT:
            raise ValueError(f"format {header['format']!r}")
        block, rest = int(header["block"]), np.frombuffer(data, np.uint8, offset=8 + length)
        names = [name for name, _, _ in header["quantised"]]
        sizes = [math.prod(shape) for _, shape, _ in header["quantised"]]
        template = {name: np.broadcast_to(np.float32(0), tuple(shape)) for name, shape, _ in header["quantised"]}
        count = packed_size("int8", block, sizes)
        if rest.size < count:
            raise ValueError("it is cut short")
        values = decode(rest[:count], "int8", block, names, template) if names else {}
        state = {name: torch.from_numpy(values[name].copy()).to(_FLOATS[d]) for name, _, d in header["quantised"]}
        offset = count
        for name, shape, dtype in header["kept"]:
            kind = np.dtype(dtype)
            size = math.prod(shape) * kind.itemsize
            if offset + size > rest.size:
                raise ValueError("it is cut short")
            state[name] = torch.from_numpy(rest[offset : offset + size].view(kind).reshape(tuple(shape)).copy())
            offset += size
        if offset != rest.size:
            raise ValueError("it has bytes beyond its tensors")
        return OrderedDict((name, state[name]) for name in header["order"])
    except (ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise FedtrainError(f"this is not a model written by fedtrain export --quantize int8 ({exc}).") from None


def load_quantized(path: str | Path) -> OrderedDict[str, torch.Tensor]:
    """A model written by `fedtrain export --quantize int8`, as a float state_dict for `load_state_dict`.

    Args:
        path: the file.

    Returns:
        The dequantised state_dict.

    Raises:
        FedtrainError: a missing file, or one that is not such a model.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FedtrainError(f"{path} does not exist.") from None
    return dequantize_state(data)
