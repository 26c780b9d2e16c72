"""What a NIC controller reports: its status, and what a reload would do to it (reload --dry-run)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from netwatch.config import NicConfig
from netwatch.nic.state import NicState
from netwatch.nic.wirings import guest_side
from netwatch.untrusted import displayable

if TYPE_CHECKING:
    from netwatch.nic.controller import NicController


def plan(ctl: NicController, nic: NicConfig) -> dict[str, str] | None:
    """What applying ``nic`` would do to this NIC (reload --dry-run), or None for nothing."""
    now = ctl.nic
    if ctl.retiring:
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
    if now.lower != nic.lower or ctl.override is not None:
        target = nic.lower.describe() if nic.lower else "-"
        if ctl.override is not None:
            why = f"back from the rebind to {ctl.override.describe()} to {target}"
        else:
            why = f"lower {now.lower.describe() if now.lower else '-'} -> {target}"
        return {"action": "rebind", "why": why + (" (a replug)" if nic.wiring == "direct" and
                                                  nic.backend == "macvtap" else "")}
    return None


def _cause(ctl: NicController) -> str:
    # Connection attempts fail without a transition: say why while waiting.
    if ctl.fsm.state is NicState.WAITING_VM and ctl.vm is not None and ctl.vm.last_error:
        return f"QEMU is not connected: {ctl.vm.last_error}"
    return ctl.fsm.cause

def status(ctl: NicController) -> dict[str, Any]:
    lower = ctl.find_lower()
    backend = ctl.backend
    status: dict[str, Any] = {
        "id": ctl.nic.id,
        "backend": ctl.nic.backend,
        "state": ctl.fsm.state.value,
        "cause": _cause(ctl),
        "lower": lower.name if lower else ctl.spec_name(),
        "lower_ifindex": lower.index if lower else None,
        "lower_present": lower is not None,
        "ifname": backend.ifname if backend else ctl.nic.ifname,
        "ifindex": backend.ifindex if backend else None,
        "netdev": backend.tap_netdev if backend else None,
        "hub_netdev": backend.hub_netdev if backend else None,
        "hub": ctl.nic.hub if ctl.life.wiring.hub is None else ctl.life.wiring.hub,
        "mac": ctl.nic.mac,
        "mode": ctl.nic.mode,
        "guest_pci": str(ctl.nic.guest_pci) if ctl.nic.guest_pci else None,
        "wiring": ctl.nic.wiring,
        "queues": ctl.nic.queues,
        "guest_present": ctl.life.wiring.guest_present,
        "guest_link": ctl.life.guest_link,
        # Whether its if-up ran (a routed tap waits while its guest migrates).
        "configured": backend.configured if backend else False,
        "migration": ctl.life.phase or None,
        "swaps": ctl.life.swaps,
        "last_attach_seconds": ctl.life.last_attach_seconds,
        "hook_failures": ctl.env.hooks.failures.get((ctl.vm_name, ctl.nic.id), 0),
        "generation": ctl.life.generation,
        "last_change": ctl.fsm.last_change,
    }
    counters = ctl.env.counters.get(backend.ifindex) if backend else None
    for key in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"):
        status[key] = getattr(counters, key) if counters else None
    if ctl.retiring:
        status["removing"] = True
    if ctl.override is not None:
        status["rebound"] = {"lower": ctl.override.describe(),
                             "config_lower": ctl.nic.lower.describe() if ctl.nic.lower else None,
                             "until": "the next reload or restart, which returns to the config"}
    if ctl.nic.bridge is not None:
        status["bridge"] = ctl.nic.bridge
        status["bridge_present"] = ctl.env.links.named(ctl.nic.bridge) is not None
    # A lower's name from the kernel need not be UTF-8 (its cause may quote it): shown escaped.
    return dict(displayable(status))
