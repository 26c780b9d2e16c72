"""What every NIC shares: the host's links as netwatch sees them and the tools to act on them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tenacity.wait import wait_base

from netwatch.config import NicConfig
from netwatch.host.linkops import LinkOps
from netwatch.host.links import LinkTable
from netwatch.host.linkstats import LinkCounters
from netwatch.nic.records import RecordStore
from netwatch.service.hooks import HookRunner


@dataclass
class NicEnv:
    """What every NIC controller shares: the host view and the tools to act."""

    links: LinkTable
    ops: LinkOps
    records: RecordStore
    hooks: HookRunner
    node_dir: str
    # With udevd: whether a link (ifindex, name now) is one udevd is done with (netwatch/host/udev.py).
    lower_ready: Callable[[int, str], bool] | None = None
    retry_wait: wait_base | None = None
    unplug_timeout: float = 15.0
    migration_handover: float = 0.25
    # ifindex -> the kernel's traffic counters, as last read (status, metrics).
    counters: dict[int, LinkCounters] = field(default_factory=dict)
    on_state_change: Callable[[], None] | None = None
    # Every backend name of every configured NIC: never a lower.
    own_links: Callable[[], set[str]] = set
    # Told (with the NIC's controller: Any, as this module is below it) when a NIC's interest() may have changed.
    on_interest_change: Callable[[Any], None] = lambda nic: None
    # Why this host cannot serve a NIC at all (its kernel lacks a module the NIC's wiring needs), or None.
    refusal: Callable[[NicConfig], str | None] = lambda nic: None
