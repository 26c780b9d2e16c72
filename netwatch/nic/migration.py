"""When a NIC is configured (its if-up ran) while its VM migrates, and with which context.

Ganeti's rules, per NIC, from the VM's run state on this host:

* A routed tap is announced by the host (routes, proxy ARP/NDP): never by
  two hosts at once. On the target it is configured only once the guest
  runs there; on the source it is deconfigured as soon as QEMU stops the
  guest for the migration's last pass (``finish-migrate``), which is before
  the target can resume it. A source that resumes instead configures it
  again (context ``reattach``).
* Bridged taps and macvtaps are configured on the target at once, so the
  announcement the guest sends when it resumes reaches the switches; the
  source keeps them until its QEMU exits (if-down ``migrate-out``).

The phase is kept in the NIC's runtime record, so a restarted netwatch
knows that a target paused after receiving the guest (``-S``) has not run it.
These are the rules alone; netwatch/nic/hookplan.py applies them to a NIC.
"""

from __future__ import annotations

from netwatch.config import NicConfig
from netwatch.qemu.runstate import IN, NONE, OUT, phase

__all__ = ["IN", "NONE", "OUT", "down_context", "phase", "routed", "up_context", "wants_configured"]


def routed(nic: NicConfig) -> bool:
    return nic.backend == "tap" and nic.mode == "routed"


def wants_configured(nic: NicConfig, now: str) -> bool:
    """Whether the NIC's if-up should have run in phase ``now``."""
    return not (routed(nic) and now in (IN, OUT))


def up_context(now: str, before: str) -> str | None:
    """The if-up context a migration gives, or None for the usual one."""
    if now == IN or before == IN:
        return "migrate-in"
    if before == OUT:
        return "reattach"
    return None


def down_context(now: str) -> str:
    """The if-down context when a configured NIC's QEMU goes away in phase ``now``."""
    return {IN: "migrate-failed", OUT: "migrate-out"}.get(now, "stop")
