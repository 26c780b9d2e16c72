"""A lower given by MAC whose card is replaced in its slot by one with another MAC (issue 24).

The new card is not used (the config names the old one); the NIC says why,
once in the journal and in status, and a lower given by PCI address follows
the slot. The real card swap runs in tests/test_hotswap.py (device_add with
a new MAC on the outer QEMU); here the rules, with a link table of the
test's own and the PCI slots it says.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from netwatch.config import LowerSpec, NicConfig
from netwatch.host import backends
from netwatch.host.links import Link, LinkTable
from netwatch.nic import lowers as lowers_mod
from netwatch.nic.lowers import LowerChoice

OLD, NEW = "52:54:00:aa:00:05", "52:54:00:aa:00:99"
SLOT = "0000:00:05.0"


def card(index: int, mac: str, name: str = "ens5") -> Link:
    return Link(index=index, name=name, kind=None, mac=mac, parent=None, flags=0)


@pytest.fixture
def slots(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    where: dict[str, str] = {"ens5": SLOT}
    monkeypatch.setattr(lowers_mod, "pci_address", where.get)
    monkeypatch.setattr(backends, "pci_address", where.get)
    return where


def choice(table: LinkTable, spec: LowerSpec) -> LowerChoice:
    env = SimpleNamespace(links=table, own_links=set, lower_ready=None)
    nic = NicConfig(id="nw2", backend="macvtap", lower=spec, mac="52:54:00:5e:00:03", hub=0, model="virtio-net-pci",
                    ifname="nw-vm1-nw2")
    return LowerChoice(nic, env)  # type: ignore[arg-type]


def test_a_card_with_another_mac_in_the_slot_is_named_once_and_not_used(slots: dict[str, str]) -> None:
    table = LinkTable()
    table.replace([card(3, OLD)])
    lower = choice(table, LowerSpec(mac=OLD))
    lower.last = lower.find(set(), None)
    assert lower.last is not None and lower.last.index == 3
    table.replace([])  # unplugged
    assert lower.find(set(), None) is None and lower.replaced() is None
    table.replace([card(9, NEW)])  # another card at the same slot, renamed ens5 by udev
    assert lower.find(set(), None) is None, "the new card must not be used"
    assert lower.replaced() == (table.get(9), True)
    assert lower.replaced() == (table.get(9), False), "said once"
    assert lower.replaced_note is not None and NEW in lower.replaced_note and "has MAC" in lower.replaced_note
    table.replace([card(11, OLD)])  # the old card back
    lower.last = lower.find(set(), None)
    assert lower.last is not None and lower.replaced_note is None


def test_another_slot_or_a_lower_given_by_pci_is_not_a_replacement(slots: dict[str, str]) -> None:
    table = LinkTable()
    table.replace([card(3, OLD)])
    lower = choice(table, LowerSpec(mac=OLD))
    lower.last = lower.find(set(), None)
    slots["ens5"] = "0000:00:06.0"  # the name is back, on another slot
    table.replace([card(9, NEW)])
    assert lower.replaced() is None
    by_pci = choice(table, LowerSpec(pci=SLOT))
    slots["ens5"] = SLOT
    found = by_pci.find(set(), None)
    assert found is not None and found.mac == NEW and by_pci.replaced() is None
