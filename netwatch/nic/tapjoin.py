"""A redirect NIC's side in the kernel: its persistent tap and the macvlan joined to it.

Under the redirect wiring (netwatch/nic/redirect.py) QEMU keeps one tap for
its whole life; a macvlan with the guest's MAC on the lower and two tc
ingress filters (u32 match-all, mirred egress redirect), one each way,
join the two. They are made, checked, repaired and taken apart here; which
macvlan the NIC has, its record, its hooks and what is said are
netwatch/nic/redirect.py's.
"""

from __future__ import annotations

import contextlib
import errno
import pwd

from netwatch.config import NicConfig
from netwatch.errors import LinkError
from netwatch.host.backends import LinkVanished
from netwatch.host.links import Link
from netwatch.host.tc import U32_FIRST_HANDLE
from netwatch.nic.env import NicEnv
from netwatch.nic.records import NicRecord
from netwatch.qemu.vm import QemuVm


class TapJoin:
    """One redirect NIC's tap (:attr:`tap_index`) and the macvlans and filters that join it to a lower."""

    def __init__(self, nic: NicConfig, vm: QemuVm, env: NicEnv) -> None:
        self.nic = nic
        self.vm = vm
        self.env = env
        self.tap_index: int | None = None

    def configure(self, nic: NicConfig) -> bool:
        """Take ``nic``'s config; whether the tap is another one (made or found on the next pass)."""
        old, self.nic = self.nic, nic
        renewed = (old.ifname, old.queues, old.mac) != (nic.ifname, nic.queues, nic.mac)
        if renewed:
            self.tap_index = None
        return renewed

    # -- the tap ------------------------------------------------------------------

    @property
    def tap(self) -> int:
        """The tap's ifindex, once :meth:`ensure_tap` found or made it."""
        assert self.tap_index is not None
        return self.tap_index

    def _owner(self) -> int | None:
        user = self.vm.identity.qemu_user
        if user is None:
            return None  # only a process with CAP_NET_ADMIN may then open the tap
        try:
            return pwd.getpwnam(user).pw_uid
        except KeyError as exc:
            raise LinkError(f"user {user} (the VM's qemu_user) does not exist") from exc

    async def ensure_tap(self) -> bool:
        """The persistent tap there; whether it had to be made or found again (it was not the one known)."""
        tap = self.env.links.named(self.nic.ifname)
        if tap is not None and tap.index == self.tap_index:
            return False
        self.tap_index = await self.env.ops.ensure_tap(self.nic.ifname, self.nic.queues, self._owner(), self.nic.mac)
        return True

    async def delete_tap(self) -> None:
        """The tap gone (:meth:`LinkOps.delete_tap`); a LinkError (QEMU still holds it) leaves it known."""
        await self.env.ops.delete_tap(self.nic.ifname, self.nic.mac)
        self.tap_index = None

    # -- the macvlan and its filters --------------------------------------------------

    async def joined(self, record: NicRecord) -> bool:
        """Whether the kernel still has ``record``'s wiring as netwatch made it: macvlan, tap and both filters."""
        macvlan, tap = self.env.links.get(record.macvlan_ifindex), self.env.links.get(record.ifindex)
        if macvlan is None or tap is None or tap.index != self.tap_index or not self.ours(macvlan):
            return False
        if macvlan.name != record.macvlan or macvlan.parent != record.lower_ifindex:
            return False
        return (await self.env.ops.redirects(tap.index) == [(U32_FIRST_HANDLE, macvlan.index)]
                and [target for _handle, target in await self.env.ops.redirects(macvlan.index)] == [tap.index])

    def ours(self, link: Link) -> bool:
        return link.kind == "macvlan" and link.mac == self.nic.mac and link.name in self.nic.macvlan_names

    async def delete_macvlan(self, name: str, *, strict: bool = True) -> None:
        """The macvlan ``name`` gone if it is the NIC's; one that is not stays, said by a LinkError (not
        ``strict``: unsaid, as the kernel's refusal is)."""
        try:
            link = self.env.links.named(name)
            if link is None:
                return
            if not self.ours(link):
                raise LinkError(f"{name} (ifindex {link.index}, {link.kind or 'no kind'}, MAC {link.mac or 'none'}) "
                                "is not a macvlan netwatch made for this NIC: it is left alone", errno.EEXIST)
            await self.env.ops.delete(link.index)
        except LinkError:
            if strict:
                raise

    async def delete_macvlans(self, *, strict: bool = True) -> None:
        """Every macvlan the NIC may have gone (:meth:`delete_macvlan`, each on its own)."""
        for name in self.nic.macvlan_names:
            await self.delete_macvlan(name, strict=strict)

    async def join(self, name: str, lower: Link, cut: NicRecord | None = None) -> int:
        """A macvlan ``name`` on ``lower`` made and joined to the tap both ways; its ifindex.

        The macvlan stays down until both filters are in place: up before,
        the guest's frames would reach the host's own stack. The tap's
        filter is replaced, never added: an old one may point at a macvlan
        that is gone, and drops everything. ``cut`` (a rebind): the old
        lower's macvlan goes (its filter with it) before the tap sends to the
        new one, which only then comes up: the guest is on neither network
        for a moment, never on both.
        """
        tap, ops = self.tap, self.env.ops
        await self.delete_macvlan(name)
        try:
            index = await ops.add_macvlan(name, lower.index, self.nic.mac, self.nic.mode, up=False)
        except LinkError as exc:
            if exc.errno == errno.ENODEV:
                raise LinkVanished(str(exc)) from exc
            raise
        try:
            await ops.ensure_ingress(index)
            await ops.redirect(index, tap, replace=False)
            old = self.env.links.get(cut.macvlan_ifindex) if cut is not None else None
            if old is not None and self.ours(old):
                await ops.delete(old.index)
            await ops.ensure_ingress(tap)
            await ops.redirect(tap, index, replace=True)
            await ops.bring_up(index)
        except BaseException:
            with contextlib.suppress(LinkError):
                await ops.delete(index)
            raise
        return index

    async def repair(self, backend: NicRecord) -> list[str]:
        """``backend``'s two filters put back where something else took them away; the links whose were."""
        tap, macvlan, ops = self.tap, backend.macvlan_ifindex, self.env.ops
        restored = []
        try:
            if await ops.redirects(tap) != [(U32_FIRST_HANDLE, macvlan)]:
                await ops.ensure_ingress(tap)
                await ops.redirect(tap, macvlan, replace=True)
                restored.append(self.nic.ifname)
            if [target for _handle, target in await ops.redirects(macvlan)] != [tap]:
                await ops.ensure_ingress(macvlan)
                await ops.redirect(macvlan, tap, replace=True)
                restored.append(backend.macvlan)
        except LinkError as exc:
            if exc.errno == errno.ENODEV:
                # The macvlan (or its lower) is going: its removal event is on its way, and the pass it
                # brings detaches it. No failure (every lower flap said "No such device" before).
                raise LinkVanished(str(exc)) from exc
            raise
        return restored
