"""Events in, per NIC: which link changes concern it.

The reconciler routes each link event by lookup on these keys (with
hundreds of NICs, an event must not ask every NIC), then kicks the NICs
concerned unless the change only shows a NIC's own backend as it is (the
wiring's ``expected``).
"""

from __future__ import annotations

from collections.abc import Iterable

from netwatch.config import LowerSpec
from netwatch.host.links import Link
from netwatch.nic.records import NicRecord

Key = tuple[str, object]


def keys(names: Iterable[str], bridge: str | None, specs: Iterable[LowerSpec | None], backend: NicRecord | None,
         lower: Link | None) -> set[Key]:
    """The link names, MACs and ifindexes whose changes concern a NIC.

    ``names``: its own links' names; ``specs``: every lower it may be
    asked to follow (config, rebind, pending reload). ("any", None) means
    every link (a PCI match needs sysfs, not the event).
    """
    found: set[Key] = {("name", name) for name in names}
    if bridge:
        found.add(("name", bridge))
    for spec in specs:
        if spec is None:
            continue
        if spec.pci is not None:
            found.add(("any", None))
        elif spec.name is not None:
            found.add(("name", spec.name))
        elif spec.mac is not None:
            found.add(("mac", spec.mac))
    if backend is not None:
        found.update((("index", backend.ifindex), ("index", backend.lower_ifindex)))
    if lower is not None:
        # By name too: a card replaced in its slot comes back under the old one's predictable name.
        found.update((("index", lower.index), ("name", lower.name)))
    return found
