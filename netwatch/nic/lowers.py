"""Which link is a NIC's lower: its config's spec, or a rebind's until the
next reload or restart, matched on the host's links as they are now."""

from __future__ import annotations

from collections.abc import Container

from netwatch.config import LowerSpec, NicConfig
from netwatch.host.backends import find_lower, matching_lowers, pci_address
from netwatch.host.links import Link
from netwatch.nic.env import NicEnv
from netwatch.nic.records import NicRecord


class LowerChoice:
    """One NIC's lower: what it is asked to follow, and the link that was last that."""

    def __init__(self, nic: NicConfig, env: NicEnv) -> None:
        self.nic = nic
        self.env = env
        self.override: LowerSpec | None = None  # set by rebind until the next reload/restart
        self._last: Link | None = None  # the lower last found
        # A lower given by MAC: the PCI slot it was last found at, and the card found there since with
        # another MAC (netwatch's sentence about it), so that the NIC says why it waits (``replaced``).
        self._slot: str | None = None
        self.replaced_note: str | None = None
        self._reported: int | None = None

    @property
    def last(self) -> Link | None:
        return self._last

    @last.setter
    def last(self, link: Link | None) -> None:
        if link is not None and (self._last is None or link.index != self._last.index):
            spec = self.spec
            self._slot = pci_address(link.name) if spec is not None and spec.mac and not spec.pci else None
        if link is not None:
            self.replaced_note = None
        self._last = link

    def replaced(self) -> tuple[Link, bool] | None:
        """The card now at the slot of a lower given by MAC, when it has another MAC (the lower was replaced),
        and whether this is the first pass to see it; it is never used as the lower."""
        spec, last = self.spec, self._last
        if spec is None or not spec.mac or spec.pci or self._slot is None or last is None:
            return None
        # Predictable names come from the slot: the new card has the old one's name once udev is done.
        link = self.env.links.named(last.name)
        if link is None or link.mac == spec.mac or not self.ready(link) or pci_address(link.name) != self._slot:
            return None
        self.replaced_note = (f"{link.name} at PCI {self._slot}, where lower {spec.mac} was, now has MAC {link.mac}: "
                              "not used, as the lower is given by MAC (give it by pci to follow the slot)")
        first, self._reported = self._reported != link.index, link.index
        return link, first

    @property
    def spec(self) -> LowerSpec | None:
        return self.override or self.nic.lower

    def configure(self, nic: NicConfig) -> None:
        """A reload: the config's lower applies again (a rebind ends here)."""
        self.nic, self.override = nic, None

    def matching(self, names: Container[str]) -> list[Link]:
        """Every link the spec matches now, never one of netwatch's backends (``names``: this NIC's)."""
        return matching_lowers(self.spec, _Either(self.env.own_links(), names), self.env.links, self.ready)

    def pick(self, matches: list[Link], backend: NicRecord | None) -> Link | None:
        """The one lower among ``matches``: the only one, or the one the backend is on now."""
        if len(matches) == 1:
            return matches[0]
        # A second match appearing under an attached NIC (a VLAN made on its
        # lower, say) must not tear the NIC down: it stays where it is.
        current = [link for link in matches if backend is not None and link.index == backend.lower_ifindex]
        return current[0] if current else None

    def find(self, names: Container[str], backend: NicRecord | None) -> Link | None:
        return self.pick(self.matching(names), backend)

    def target(self, spec: LowerSpec) -> Link | None:
        """The link a rebind to ``spec`` would go to."""
        return find_lower(spec, set(), self.env.links, self.ready)

    def ready(self, link: Link) -> bool:
        # With udevd, a link is used only once udev is done with it (renames).
        return self.env.lower_ready is None or self.env.lower_ready(link.index, link.name)

    def spec_name(self) -> str:
        spec = self.spec
        return spec.describe() if spec else "-"

    def name(self) -> str | None:
        """The lower's name for messages: the one last found, else the config's spec."""
        return self.last.name if self.last else (self.nic.lower.describe() if self.nic.lower else None)


class _Either:
    """Names in either collection, without building their union (every NIC's pass asks: that was O(NICs))."""

    def __init__(self, first: Container[str], second: Container[str]) -> None:
        self.first, self.second = first, second

    def __contains__(self, name: object) -> bool:
        return name in self.first or name in self.second
