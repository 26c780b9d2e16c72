"""Events in, per NIC: which link changes concern it, and which of those need no pass.

The reconciler routes each link event by lookup on these keys (with
hundreds of NICs, an event must not ask every NIC), then kicks the NICs
concerned unless the change only shows a NIC's own macvtap as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from netwatch.host.links import Link

if TYPE_CHECKING:  # the controller imports this module
    from netwatch.nic.controller import NicController


def keys(nic: NicController) -> set[tuple[str, object]]:
    """The link names, MACs and ifindexes whose changes concern ``nic``.

    ("any", None) means every link (a PCI match needs sysfs, not the event).
    """
    config = nic.nic
    found: set[tuple[str, object]] = {("name", name) for name in config.backend_names}
    if config.bridge:
        found.add(("name", config.bridge))
    for spec in (config.lower, nic.override, nic.pending_config.lower if nic.pending_config else None):
        if spec is None:
            continue
        if spec.pci is not None:
            found.add(("any", None))
        elif spec.name is not None:
            found.add(("name", spec.name))
        elif spec.mac is not None:
            found.add(("mac", spec.mac))
    if nic.backend is not None:
        found.update((("index", nic.backend.ifindex), ("index", nic.backend.lower_ifindex)))
    if nic.lower is not None:
        found.add(("index", nic.lower.index))
    return found


def expected(nic: NicController, old: Link | None, new: Link | None) -> bool:
    """Whether a link change only shows ``nic``'s own macvtap as it is being made or as recorded.

    Each new macvtap brings its NIC two to three events (link messages, a
    uevent) that would each cost a pass deciding nothing: at 256 NICs
    reattaching at once, a second pass for every NIC. A rename, a removal,
    another parent or MAC is never expected, nor any change of a tap (its
    flags and bridge are put back by a pass).
    """
    if new is None or nic.driver.own_flags_matter or new.kind != "macvtap":
        return False
    if old is not None and (old.name, old.parent, old.kind, old.mac) != (new.name, new.parent, new.kind, new.mac):
        return False
    backend = nic.backend
    if backend is not None and new.index == backend.ifindex:
        return new.name == backend.ifname and new.parent == backend.lower_ifindex
    return nic.life.making == (new.name, new.parent)
