"""What the public Fleet port accepts: body sizes derived from the run's model, concurrency, timeouts.

Flower 1.42 moves a message as content-addressed objects, one object per `push-object` request,
and cuts every array into chunks of at most FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE bytes (5 MiB). fedtrain
seals a message's whole content into one array (the envelope), so the largest legitimate request
body is one chunk of the largest envelope: a model's values at 8 bytes each at most (float32 updates
take 4; SecAgg+'s masked vectors are int64), with a margin for the envelope's own records (ledger,
metrics, archive headers), capped at one chunk. Every other Fleet request (heartbeats, pulls, node
activation, the message tree of `push-messages`) is small.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

from fedtrain.config import Config
from fedtrain.errors import FedtrainError

KIB, MIB = 1024, 1024 * 1024
WIRE_BYTES_PER_VALUE = 8  # int64 masked vectors (SecAgg+); plain float32 updates need 4
MARGIN = 2
ENVELOPE_RECORDS = 256 * KIB  # ledger, metrics, archive headers, AEAD header
OBJECT_OVERHEAD = 64 * KIB  # Flower's object header and the protobuf request around it
LARGE_ENDPOINTS = frozenset({"/v1/fleet/push-object", "/v1/fleet/push-messages"})


@dataclass(frozen=True)
class GatewayLimits:
    """Bounds on what clients may ask of the gateway, alone and together.

    Memory held for request bodies is at most `large_requests` x 2 x `large_body` plus
    `small_requests` x 2 x `small_body` (each body once as read, once as forwarded)."""

    large_body: int  # push-object / push-messages
    small_body: int = 64 * KIB  # every other Fleet request
    max_head: int = 16 * KIB  # request line and headers
    large_requests: int = 8  # large bodies in memory at once, over all clients
    small_requests: int = 64
    # In flight per node key (per address without node auth). A SuperNode has at most 4: its main loop,
    # its heartbeat and Flower's 2 object-transfer workers; one node cannot take all the large slots.
    requests_per_client: int = 4
    # Per node key (per address without node auth), over time: far above a SuperNode's heartbeats, polls and
    # object transfers (5 MiB each), low enough that one member cannot keep the SuperLink busy alone.
    requests_per_second: float = 50.0
    request_burst: int = 200
    max_connections: int = 512
    connections_per_address: int = 64  # SuperNodes behind one NAT share an address
    handshake_timeout: float = 10.0  # TLS
    head_timeout: float = 20.0  # from waiting for a request (keep-alive idle included) to its last header
    queue_timeout: float = 10.0  # for a free slot, then 503 (Flower's SuperNode retries 503)
    read_timeout: float = 20.0  # without a byte of the body
    min_rate: int = 32 * KIB  # bytes per second: a body (or reply) may take 30 s + its size at this rate
    upstream_timeout: float = 120.0

    def body_limit(self, path: str) -> int:
        """The largest body this endpoint may carry."""
        return self.large_body if path in LARGE_ENDPOINTS else self.small_body

    def transfer_time(self, size: int) -> float:
        """Seconds allowed to move `size` bytes: slow links pass, a client that dribbles does not."""
        return 30.0 + size / self.min_rate


def largest_body(values: int) -> int:
    """The largest legitimate Fleet request body for a model with `values` values (bytes)."""
    # Flower pushes a message object by object, and the records (a sealed message's manifest chunk, or a
    # plain message's config and metric records) never share an object with the values' arrays: the
    # largest object is one or the other, not both.
    largest_object = max(MARGIN * WIRE_BYTES_PER_VALUE * values, ENVELOPE_RECORDS)
    return min(largest_object, FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE) + OBJECT_OVERHEAD


def model_values(config: Config) -> int:
    """Values in the run's model (its state dict: parameters and buffers).

    Raises:
        FedtrainError: the config does not describe the model's input, or the model cannot be built.
    """
    from fedtrain.models import build_model

    classes = config.data.num_classes or len(config.data.labels or [])
    if not config.data.input_shape or not classes:
        raise FedtrainError("the config must give input_shape and num_classes (or labels) to size the Fleet port.")
    model = build_model(config.training.model, list(config.data.input_shape), classes, hidden=config.training.hidden)
    return sum(tensor.numel() for tensor in model.state_dict().values())


def gateway_limits(config: Config) -> GatewayLimits:
    """Limits for the run described by `config`.

    Args:
        config: the resolved run config (model, input shape, classes).

    Returns:
        GatewayLimits with the large-body limit derived from the model's size.

    Raises:
        FedtrainError: the model cannot be built from the config.
    """
    return GatewayLimits(large_body=largest_body(model_values(config)))
