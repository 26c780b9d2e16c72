"""The reconciler for one NIC: compare what is with what should be, decide, and have its wiring act.

Level-triggered: events only *kick* a NIC; every pass re-reads the link
table and the VM session, so a lost or duplicated event never leaves a NIC
wrong. One task per NIC serialises its operations (reconcile passes and
admin requests such as rebind); NICs run in parallel. What the wiring may
be asked is netwatch/nic/wiring.py; how the NIC's state moves,
netwatch/nic/state.py.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, wait_exponential
from tenacity.wait import wait_base

from netwatch import events
from netwatch.config import NicConfig
from netwatch.errors import NetwatchError
from netwatch.host.backends import LinkVanished, Placement, ambiguity
from netwatch.host.links import Link
from netwatch.nic import interest, report
from netwatch.nic.env import NicEnv
from netwatch.nic.hookplan import HookPlan
from netwatch.nic.lowers import LowerChoice
from netwatch.nic.rebind import Rebinds
from netwatch.nic.records import NicRecord
from netwatch.nic.state import NicEvent, NicState, NicStateMachine
from netwatch.nic.wiring import NicWiring
from netwatch.nic.wirings import make_wiring
from netwatch.qemu.vm import QemuVm
from netwatch.untrusted import displayable

log = logging.getLogger(__name__)


def default_retry_wait() -> wait_base:
    return wait_exponential(multiplier=0.2, min=0.2, max=30.0)


class NicController:
    """One guest NIC: owns its backend, its state machine and its task."""

    def __init__(self, vm_name: str, nic: NicConfig, vm: QemuVm, env: NicEnv, hot_added: bool = False) -> None:
        self.vm_name = vm_name
        self.nic = nic
        self.vm = vm
        self.env = env
        self.fsm = NicStateMachine(vm_name, nic.id, on_change=env.on_state_change)
        # Which link is its lower (the config's, or a rebind's until the next reload).
        self.lowers = LowerChoice(nic, env)
        self.first_pass = asyncio.Event()
        self._pass_waiters: list[asyncio.Future[None]] = []
        self.pending_config: NicConfig | None = None
        self._kick = asyncio.Event()
        self._kick.set()
        # Which hooks the NIC's backends get, with which context (its VM's migration phase too).
        self.hooks = HookPlan(nic, vm, env, hot_added)
        # The backend itself: what is attached, and how to make, swap and drop it.
        self.wiring: NicWiring = make_wiring(vm_name, nic, vm, env, self.hooks, self._lower_name)
        # An admin's moves to another lower, served between passes.
        self.rebinds = Rebinds(vm_name, vm, env, self.lowers, self.wiring, self.kick,
                               lambda: env.on_interest_change(self))
        # Set when the NIC left the config of a running VM: the loop hot-removes it and ends.
        self.retiring = False

    @property
    def backend(self) -> NicRecord | None:
        return self.wiring.backend

    @property
    def driver(self) -> Any:
        return self.wiring.driver

    # -- events in ----------------------------------------------------------

    def kick(self) -> None:
        self._kick.set()

    def next_pass(self) -> asyncio.Future[None]:
        """A future done when the next pass ends (the NIC is kicked for it)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pass_waiters.append(waiter)
        self.kick()
        return waiter

    @property
    def kicked(self) -> bool:
        """Whether a pass is due (an event arrived since the last one began)."""
        return self._kick.is_set()

    def interest(self) -> set[tuple[str, object]]:
        """The link names, MACs and ifindexes whose changes concern this NIC (netwatch/nic/interest.py)."""
        specs = (self.nic.lower, self.lowers.override, self.pending_config.lower if self.pending_config else None)
        return interest.keys(self.wiring.names(), self.nic.bridge, specs, self.backend, self.lowers.last)

    def expected(self, old: Link | None, new: Link | None) -> bool:
        """Whether a link change only shows this NIC's own backend as made or recorded (no pass needed)."""
        return self.wiring.expected(old, new)

    def retire(self) -> None:
        """A reload dropped the NIC: hot-remove it from the running guest, then stop."""
        self.retiring = True
        self.kick()

    def update_config(self, nic: NicConfig) -> None:
        """A reload: the new config applies from the next pass (rebinds end there)."""
        self.retiring = False
        self.pending_config = nic
        self.env.on_interest_change(self)
        self.kick()

    async def rebind(self, lower: str) -> dict[str, Any]:
        """Move the NIC to ``lower`` now (make-before-break); its status after (netwatch/nic/rebind.py)."""
        return await self.rebinds.request(lower)

    # -- the loop -----------------------------------------------------------

    async def run(self) -> None:
        wait = self.env.retry_wait or default_retry_wait()
        await self.vm.first_attempt.wait()
        while True:
            await self._kick.wait()
            self._kick.clear()
            if self.pending_config is not None:
                # Between passes, never in the middle of one.
                self.nic, self.pending_config = self.pending_config, None
                self.lowers.configure(self.nic)
                self.hooks.nic = self.nic
                self.wiring.configure(self.nic)
            await self.rebinds.serve(self.retiring, self.status)
            try:
                await self._reconcile_or_fail()
            except Exception:  # noqa: BLE001 - reported by _reconcile_or_fail; not BaseException: cancellation ends the loop
                await self._retry(wait)
            if self.retiring and self.backend is None and not (self.vm.connected and self.wiring.guest_present):
                return

    async def _retry(self, wait: wait_base) -> None:
        """Pass again after tenacity's wait for each failure so far, until one succeeds.

        Only a failed pass gets here: building tenacity's retry machinery for
        every pass cost a fifth of a reattach's CPU time at 256 NICs.
        """
        failures = 1
        while True:
            state = RetryCallState(AsyncRetrying(), None, (), {})
            state.attempt_number = failures
            await self._backoff(wait(state))
            try:
                await self._reconcile_or_fail()
                return
            except Exception:  # noqa: BLE001 - reported by _reconcile_or_fail; retried
                failures += 1

    async def _backoff(self, seconds: float) -> None:
        # A change of the VM's run state cuts a retry's wait short: a source
        # must not route its guest for 30 s after the target took it over.
        changed = self.vm.runstate.next_change()
        try:
            await asyncio.wait([changed], timeout=seconds)
        finally:
            changed.cancel()

    async def _reconcile_or_fail(self) -> None:
        try:
            if self.retiring:
                # Still deconfigured in its phase while it waits to leave the guest.
                self.hooks.observe(self.backend)
                await self.wiring.follow_migration()
                await self.wiring.hot_remove()
            else:
                await self.reconcile()
        except NetwatchError as exc:
            # QEMU's view is unknown after a failed or timed-out command.
            self.wiring.synced_session = 0
            self.fsm.on(NicEvent.ERROR, f"{exc} (will retry)", lower=self._lower_name())
            log.debug("%s/%s failed", self.vm_name, self.nic.id, exc_info=exc)
            raise
        except Exception as exc:
            # A bug must not take the other NICs down: report it in full, retry.
            self.wiring.synced_session = 0
            log.exception("%s/%s: internal error", self.vm_name, self.nic.id)
            self.fsm.on(NicEvent.ERROR, f"internal error: {exc!r} (will retry)", lower=self._lower_name())
            raise
        finally:
            self.first_pass.set()
            waiters, self._pass_waiters = self._pass_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self.env.on_interest_change(self)

    async def reconcile(self) -> None:
        wiring = self.wiring
        refused = self.env.refusal(self.nic) if self.backend is None else None
        if refused is not None:
            # Nothing joins it to a lower; its tap is made where the kernel can, so that its VM still starts
            # (and the NIC works without a restart once the module is there and netwatch is reloaded).
            try:
                await wiring.prepare()
            except NetwatchError as exc:
                log.debug("%s/%s: no tap either: %s", self.vm_name, self.nic.id, exc)
            self.fsm.on(NicEvent.ERROR, refused)
            return
        # What QEMU opens by name exists before it starts, whatever else is there.
        await wiring.prepare()
        self.hooks.observe(self.backend)
        if not self.vm.connected and self.vm.refused is not None:
            # Not provably this VM's QEMU: nothing of the VM's is touched,
            # not even a backend its own QEMU may still be using.
            self.fsm.on(NicEvent.PEER_REFUSED, f"QMP peer refused: {self.vm.refused}")
            return
        if not self.vm.present:
            await wiring.vm_gone()
            self.fsm.on(NicEvent.QEMU_GONE, "QEMU is not connected" if self.vm.monitored
                        else f"libvirt domain {self.vm.identity.libvirt_domain} is not running")
            return
        # First, before any QMP command that may fail or wait: a source
        # deconfigures its routed taps the moment its guest stops for good.
        await wiring.follow_migration()
        if wiring.synced_session != self.vm.session:
            await wiring.sync()
            await wiring.follow_migration()
        matches = self.lowers.matching(self.wiring.names())
        lower = self.lowers.pick(matches, self.backend)
        self.lowers.last = lower or self.lowers.last
        placement = self.driver.place(self.nic, lower, self.env.links)
        if lower is None and len(matches) > 1:
            spec = self.lowers.spec
            assert spec is not None
            placement = replace(placement, ready=False, missing=ambiguity(spec, matches))
        if self.backend is not None:
            await self._check_backend(placement)
        if self.backend is None:
            if not placement.ready:
                self._replaced_lower()
                await wiring.set_guest_link(False, placement.missing)
                self.fsm.on(NicEvent.LOWER_MISSING, placement.missing)
                return
            self.fsm.on(NicEvent.ATTACH, placement.describe())
            try:
                await wiring.attach(placement)
            except LinkVanished:
                # Its removal event is on its way; that is not a failure.
                await wiring.set_guest_link(False, "no lower")
                self.fsm.on(NicEvent.LOWER_VANISHED, f"lower {self.spec_name()} vanished while attaching")
                return
            event = NicEvent.ATTACHED
        else:
            try:
                await wiring.maintain(placement)
            except LinkVanished as exc:
                log.debug("%s/%s: %s; waiting for the link's events", self.vm_name, self.nic.id, exc)
                return
            event = NicEvent.KEPT
        await wiring.set_guest_link(self.driver.carrier(placement), "lower carrier")
        self.fsm.on(event, f"backend {self.backend.ifname if self.backend else '?'}: {placement.describe()}",
                    lower=lower.name if lower else None)

    def _replaced_lower(self) -> None:
        """A lower given by MAC whose card was replaced by one with another MAC: said once, and shown in status."""
        found = self.lowers.replaced()
        if found is not None and found[1]:
            link = found[0]
            events.emit("lower-replaced", self.lowers.replaced_note or "", vm=self.vm_name, nic=self.nic.id,
                        lower=link.name, mac=link.mac)

    async def _check_backend(self, placement: Placement) -> None:
        """Detach a dead or outdated backend; move a live one make-before-break."""
        backend = self.backend
        assert backend is not None
        broken = self.driver.broken(backend, self.env.links)
        if broken:
            await self.wiring.detach(broken, "lower-lost")
        elif not self.wiring.matches_config(backend):
            self.hooks.up_context = "rebind"
            await self.wiring.detach("the configuration changed", "rebind")
        elif (misplaced := self.driver.misplaced(backend, placement)) is not None:
            if placement.ready and self.driver.moves_by_swap:
                await self.wiring.swap(placement, f"rebind: {misplaced}")
            else:
                await self.wiring.detach(misplaced, "lower-lost")

    def find_lower(self) -> Link | None:
        return self.lowers.find(self.wiring.names(), self.backend)

    async def remove(self) -> None:
        """The NIC left the config: take its backend out of QEMU and the kernel."""
        await self.wiring.remove()

    # -- what it reports --------------------------------------------------------

    def plan(self, nic: NicConfig) -> dict[str, str] | None:
        """What applying ``nic`` would do to this NIC (reload --dry-run), or None for nothing."""
        return report.plan(self.nic, nic, self.lowers.override, self.retiring)

    def status(self) -> dict[str, Any]:
        lower = self.find_lower()
        nic = self.nic
        cause = self.fsm.cause
        if self.fsm.state is NicState.WAITING_VM and self.vm.monitored and self.vm.last_error:
            cause = f"QEMU is not connected: {self.vm.last_error}"  # attempts fail without a transition
        elif self.fsm.state is NicState.WAITING_LOWER and self.lowers.replaced_note:
            cause = self.lowers.replaced_note  # seen after the NIC began waiting: no transition
        elif self.fsm.state is NicState.WAITING_VM and not self.vm.monitored and not self.vm.present:
            cause = f"libvirt domain {self.vm.identity.libvirt_domain} is not running"  # since the service started
        status: dict[str, Any] = {
            "id": nic.id, "backend": nic.backend, "state": self.fsm.state.value, "cause": cause,
            "lower": lower.name if lower else self.spec_name(), "lower_ifindex": lower.index if lower else None,
            "lower_present": lower is not None, "mac": nic.mac, "mode": nic.mode,
            "guest_pci": str(nic.guest_pci) if nic.guest_pci else None, "wiring": nic.wiring, "queues": nic.queues,
            **self.wiring.report(),
            "migration": self.hooks.phase or None,
            "hook_failures": self.env.hooks.failures.get((self.vm_name, nic.id), 0),
            "last_change": self.fsm.last_change,
        }
        backend = self.backend
        counters = self.env.counters.get(backend.ifindex) if backend else None
        for key in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"):
            status[key] = getattr(counters, key) if counters else None
        if self.retiring:
            status["removing"] = True
        if self.lowers.override is not None:
            status["rebound"] = {"lower": self.lowers.override.describe(),
                                 "config_lower": nic.lower.describe() if nic.lower else None,
                                 "until": "the next reload or restart, which returns to the config"}
        if nic.bridge is not None:
            status["bridge"] = nic.bridge
            status["bridge_present"] = self.env.links.named(nic.bridge) is not None
        # A lower's name from the kernel need not be UTF-8 (its cause may quote it): shown escaped.
        return dict(displayable(status))

    # -- names for messages -----------------------------------------------------

    def spec_name(self) -> str:
        return self.lowers.spec_name()

    def _lower_name(self) -> str | None:
        return self.lowers.name()
