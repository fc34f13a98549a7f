#!/usr/bin/env python3
"""Print the first port of a block of N consecutive free loopback ports.

`make molecule` exports it as LEDGER_MOLECULE_PORT_BASE: every scenario's
inventory and testinfra tests derive their ports from it (base + offset), so two
checkouts, or a busy machine, never collide on a fixed port.
"""

from __future__ import annotations

import argparse
import random
import sys

from pgcluster import port_in_use


def _ephemeral_low(default: int = 32768) -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def free_block(size: int, low: int = 20000, high: int | None = None, tries: int = 200) -> int:
    # Stay below the kernel's ephemeral range: a port that is free now can otherwise be taken
    # as the local end of an outgoing connection before PostgreSQL binds it ("Address already in use").
    high = high or _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(tries):
        base = rng.randrange(low, high - size)
        if not any(port_in_use(base + i) for i in range(size)):
            return base
    raise SystemExit(f"port_block: no block of {size} free ports found in {low}-{high}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100)
    print(free_block(parser.parse_args().size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
