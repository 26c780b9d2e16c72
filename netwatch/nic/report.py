"""What a reload would do to a NIC (reload --dry-run)."""

from __future__ import annotations

from netwatch.config import LowerSpec, NicConfig
from netwatch.nic.wiring import guest_side


def plan(now: NicConfig, nic: NicConfig, override: LowerSpec | None, retiring: bool) -> dict[str, str] | None:
    """What applying ``nic`` to a NIC configured as ``now`` would do, or None for nothing."""
    if retiring:
        return {"action": "keep", "why": "back in the config while being removed"}
    if guest_side(now) != guest_side(nic):
        changed = [key for key in ("wiring", "guest_pci", "model", "queues", "hub", "mac")
                   if getattr(now, key) != getattr(nic, key)]
        return {"action": "replug", "why": f"{', '.join(changed)} changed: the guest sees its NIC leave and "
                "come back"}
    backend_keys = ("backend", "mode", "bridge", "ifname")
    changed = [key for key in backend_keys if getattr(now, key) != getattr(nic, key)]
    if changed:
        action = "replug" if nic.wiring == "direct" else "reattach"
        return {"action": action, "why": f"{', '.join(changed)} changed: a new backend"
                + (" (a replug the guest sees)" if action == "replug" else " (the guest sees nothing)")}
    if now.lower != nic.lower or override is not None:
        target = nic.lower.describe() if nic.lower else "-"
        if override is not None:
            why = f"back from the rebind to {override.describe()} to {target}"
        else:
            why = f"lower {now.lower.describe() if now.lower else '-'} -> {target}"
        return {"action": "rebind", "why": why + (" (a replug)" if nic.wiring == "direct" and
                                                  nic.backend == "macvtap" else "")}
    return None
