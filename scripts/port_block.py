#!/usr/bin/env python3
"""Free loopback ports, taken below the kernel's ephemeral range: the one home of the rule.

    port_block.py --size 100    print the first port of a block of 100 consecutive free ports

`make molecule` exports that as LEDGER_MOLECULE_PORT_BASE: every scenario's inventory and
testinfra tests derive their ports from it (base + offset). pgcluster.py, pgbouncer_ctl.py and
the pytest fixtures take single ports from free_port(). Why below the ephemeral range: a port
that is free now can otherwise be taken as the local end of an outgoing connection (the kernel
picks those from ip_local_port_range, as `bind(port 0)` does) before the server binds it
("Address already in use"). Standard library only (it runs before the virtualenv exists).
"""

from __future__ import annotations

import argparse
import random
import socket
import sys

LOW = 20000  # above the well-known and most registered service ports


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _ephemeral_low(default: int = 32768) -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def free_block(size: int, low: int = LOW, high: int | None = None, tries: int = 200) -> int:
    """The first port of `size` consecutive ports that nothing listens on, chosen at random (two
    callers racing rarely pick the same one; a server that still loses the race fails to bind)."""
    high = high or _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(tries):
        base = rng.randrange(low, high - size)
        if not any(port_in_use(base + i) for i in range(size)):
            return base
    raise SystemExit(f"port_block: no block of {size} free ports found in {low}-{high}")


def free_port() -> int:
    """One free port (a block of one)."""
    return free_block(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100)
    print(free_block(parser.parse_args().size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
