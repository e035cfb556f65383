"""What a process tree listens on, read from /proc (Linux): its TCP listeners and unconnected UDP
sockets, with the owning process, so a test can refuse any bind outside loopback."""

from __future__ import annotations

import contextlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    proto: str  # tcp, tcp6, udp, udp6
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    process: str  # "<comm> (pid)", or "?" when no process of the tree holds it

    @property
    def loopback(self) -> bool:
        """127.0.0.0/8, ::1, or 127.0.0.0/8 mapped into IPv6; never a wildcard (0.0.0.0, ::)."""
        mapped = getattr(self.address, "ipv4_mapped", None)
        return self.address.is_loopback or (mapped is not None and mapped.is_loopback)

    def __str__(self) -> str:
        return f"{self.process} {self.proto} {self.address}:{self.port}"


def _address(hex_address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """/proc/net's "0100007F:1F90": the address in 32-bit host-order words, the port in hex."""
    host, port = hex_address.split(":")
    words = [bytes.fromhex(host[i : i + 8])[::-1] for i in range(0, len(host), 8)]
    packed = b"".join(words)
    address = ipaddress.IPv4Address(packed) if len(packed) == 4 else ipaddress.IPv6Address(packed)
    return address, int(port, 16)


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [pid], [pid]
    while frontier:
        current = frontier.pop()
        children = [child for child, parent in parents.items() if parent == current]
        found.extend(children)
        frontier.extend(children)
    return found


def same_network_namespace(pid: int) -> list[int]:
    """Every process that shares `pid`'s network namespace."""
    try:
        target = os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return []
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if os.readlink(entry / "ns" / "net") == target:
                found.append(int(entry.name))
    return found


def _socket_owners(pids: list[int]) -> dict[int, str]:
    owners: dict[int, str] = {}
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue  # gone, or not ours to read
        for link in links:
            if link.startswith("socket:["):
                owners[int(link[8:-1])] = f"{name} ({pid})"
    return owners


def listeners(pids: list[int], whole_namespace: bool = False) -> list[Listener]:
    """TCP sockets in LISTEN state and UDP sockets with no peer, held by `pids`, as the kernel sees
    them in the network namespace of `pids[0]`. With `whole_namespace`, every such socket of that
    namespace counts, also one held by a process outside `pids` (a private namespace is all ours)."""
    owners = _socket_owners(pids)
    found: list[Listener] = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/{pids[0]}/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            if proto.startswith("tcp") and state != TCP_LISTEN:
                continue
            if proto.startswith("udp") and _address(remote)[1] != 0:
                continue  # connected: it talks to one peer, it does not serve anyone
            if inode not in owners and not whole_namespace:
                continue
            address, port = _address(local)
            found.append(Listener(proto, address, port, owners.get(inode, "?")))
    return found
