"""The reconciler for one NIC: compare what is with what should be, and act.

Level-triggered: events only *kick* a NIC; every pass re-reads the link
table and the VM session, so a lost or duplicated event never leaves a NIC
wrong. One task per NIC serialises its operations (reconcile passes and
admin requests such as rebind); NICs run in parallel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Container
from dataclasses import dataclass, field, replace
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, wait_exponential
from tenacity.wait import wait_base

from netwatch.config import LowerSpec, NicConfig, ifname_problem
from netwatch.errors import BadRequest, NetwatchError
from netwatch.host.backends import DRIVERS, LinkVanished, Placement, ambiguity, find_lower, matching_lowers
from netwatch.host.linkops import LinkOps
from netwatch.host.links import IFF_LOOPBACK, Link, LinkTable
from netwatch.host.linkstats import LinkCounters
from netwatch.host.udev import udev_initialized
from netwatch.nic import interest, report, teardown
from netwatch.nic.lifecycle import BackendLife
from netwatch.nic.records import NicRecord, RecordStore
from netwatch.nic.state import NicState, NicStateMachine
from netwatch.qemu.qmp import VmSession
from netwatch.service.hooks import HookRunner

log = logging.getLogger(__name__)


class RebindError(NetwatchError):
    """A rebind could not be done; the NIC kept its path."""


class BadRebind(RebindError, BadRequest):
    """A rebind to something that is not a usable lower."""


def default_retry_wait() -> wait_base:
    return wait_exponential(multiplier=0.2, min=0.2, max=30.0)


@dataclass
class NicEnv:
    """What every NIC controller shares: the host view and the tools to act."""

    links: LinkTable
    ops: LinkOps
    records: RecordStore
    hooks: HookRunner
    node_dir: str
    udev_gate: bool = False
    retry_wait: wait_base | None = None
    unplug_timeout: float = 15.0
    migration_handover: float = 0.25
    # ifindex -> the kernel's traffic counters, as last read (status, metrics).
    counters: dict[int, LinkCounters] = field(default_factory=dict)
    on_state_change: Callable[[], None] | None = None
    # Every backend name of every configured NIC: never a lower.
    own_links: Callable[[], set[str]] = set
    # Told when a NIC's interest() may have changed.
    on_interest_change: Callable[[NicController], None] = lambda nic: None


class NicController:
    """One guest NIC: owns its backend, its state machine and its task."""

    def __init__(self, vm_name: str, nic: NicConfig, vm: VmSession, env: NicEnv, hot_added: bool = False) -> None:
        self.vm_name = vm_name
        self.nic = nic
        self.vm = vm
        self.env = env
        self.fsm = NicStateMachine(vm_name, nic.id, on_change=env.on_state_change)
        self.lower: Link | None = None
        self.override: LowerSpec | None = None  # set by rebind until the next reload/restart
        self.first_pass = asyncio.Event()
        self._requests: list[tuple[LowerSpec, asyncio.Future[dict[str, Any]]]] = []
        self.pending_config: NicConfig | None = None
        self._kick = asyncio.Event()
        self._kick.set()
        # The backend itself: what is attached, and how to make, swap and drop it.
        self.life = BackendLife(vm_name, nic, vm, env, self._lower_name, hot_added)
        # Set when the NIC left the config of a running VM: the loop hot-removes it and ends.
        self.retiring = False

    @property
    def backend(self) -> NicRecord | None:
        return self.life.backend

    @property
    def driver(self) -> Any:
        return DRIVERS[self.nic.backend]

    # -- events in ----------------------------------------------------------

    def kick(self) -> None:
        self._kick.set()

    @property
    def kicked(self) -> bool:
        """Whether a pass is due (an event arrived since the last one began)."""
        return self._kick.is_set()

    def interest(self) -> set[tuple[str, object]]:
        """The link names, MACs and ifindexes whose changes concern this NIC (netwatch/nic/interest.py)."""
        return interest.keys(self)

    def expected(self, old: Link | None, new: Link | None) -> bool:
        """Whether a link change only shows this NIC's own macvtap as made or recorded (no pass needed)."""
        return interest.expected(self, old, new)

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
        """Move the NIC to ``lower`` now (make-before-break); its status after."""
        why = ifname_problem(lower)
        if why:
            raise BadRebind(f"'{lower}' {why}")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests.append((LowerSpec(name=lower), future))
        self.kick()
        return await future

    # -- the loop -----------------------------------------------------------

    async def run(self) -> None:
        wait = self.env.retry_wait or default_retry_wait()
        await self.vm.first_attempt.wait()
        while True:
            await self._kick.wait()
            self._kick.clear()
            if self.pending_config is not None:
                # Between passes, never in the middle of one.
                self.nic, self.override, self.pending_config = self.pending_config, None, None
                self.life.configure(self.nic)
            while self._requests:
                spec, future = self._requests.pop(0)
                if self.retiring:
                    future.set_exception(RebindError(f"{self.vm_name}/{self.nic.id} is being removed"))
                else:
                    await self._serve_rebind(spec, future)
            try:
                await self._reconcile_or_fail()
            except Exception:  # noqa: BLE001 - reported by _reconcile_or_fail; not BaseException: cancellation ends the loop
                await self._retry(wait)
            if self.retiring and self.backend is None and not (self.vm.connected and self.life.wiring.guest_present):
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
                self.life.observe_run_state()
                await self.life.follow_migration()
                await teardown.hot_remove(self.life)
            else:
                await self.reconcile()
        except NetwatchError as exc:
            # QEMU's view is unknown after a failed or timed-out command.
            self.life.synced_session = 0
            self.fsm.to(NicState.FAILED, f"{exc} (will retry)", lower=self._lower_name())
            log.debug("%s/%s failed", self.vm_name, self.nic.id, exc_info=exc)
            raise
        except Exception as exc:
            # A bug must not take the other NICs down: report it in full, retry.
            self.life.synced_session = 0
            log.exception("%s/%s: internal error", self.vm_name, self.nic.id)
            self.fsm.to(NicState.FAILED, f"internal error: {exc!r} (will retry)", lower=self._lower_name())
            raise
        finally:
            self.first_pass.set()
            self.env.on_interest_change(self)

    async def reconcile(self) -> None:
        self.life.observe_run_state()
        if not self.vm.connected and self.vm.refused is not None:
            # Not provably this VM's QEMU: nothing of the VM's is touched,
            # not even a backend its own QEMU may still be using.
            self.fsm.to(NicState.FAILED, f"QMP peer refused: {self.vm.refused}")
            return
        if not self.vm.connected:
            await teardown.vm_gone(self.life)
            self.fsm.to(NicState.WAITING_VM, "QEMU is not connected")
            return
        # First, before any QMP command that may fail or wait: a source
        # deconfigures its routed taps the moment its guest stops for good.
        await self.life.follow_migration()
        if self.life.synced_session != self.vm.session:
            session = self.vm.session
            await self.life.sync_with_qemu()
            self.life.synced_session = session
            await self.life.follow_migration()
        matches = self._matching_lowers()
        lower = self._pick(matches)
        self.lower = lower or self.lower
        placement = self.driver.place(self.nic, lower, self.env.links)
        if lower is None and len(matches) > 1:
            spec = self.override or self.nic.lower
            assert spec is not None
            placement = replace(placement, ready=False, missing=ambiguity(spec, matches))
        if self.backend is not None:
            await self._check_backend(placement)
        if self.backend is None:
            if not placement.ready:
                await self.life.set_guest_link(False, placement.missing)
                self.fsm.to(NicState.WAITING_LOWER, placement.missing)
                return
            self.fsm.to(NicState.ATTACHING, placement.describe())
            try:
                await self.life.attach(placement)
            except LinkVanished:
                # Its removal event is on its way; that is not a failure.
                await self.life.set_guest_link(False, "no lower")
                self.fsm.to(NicState.WAITING_LOWER, f"lower {self.spec_name()} vanished while attaching")
                return
        else:
            try:
                await self.driver.maintain(self.backend, placement, self.env.links, self.env.ops)
            except LinkVanished as exc:
                log.debug("%s/%s: %s; waiting for the link's events", self.vm_name, self.nic.id, exc)
                return
            self.life.follow_uplink(placement)
        await self.life.set_guest_link(self.driver.carrier(placement), "lower carrier")
        self.fsm.to(NicState.ATTACHED, f"backend {self.backend.ifname if self.backend else '?'}: "
                    f"{placement.describe()}", lower=lower.name if lower else None)

    async def _check_backend(self, placement: Placement) -> None:
        """Detach a dead or outdated backend; move a live one make-before-break."""
        backend = self.backend
        assert backend is not None
        broken = self.driver.broken(backend, self.env.links)
        if broken:
            await self.life.detach(broken, "lower-lost")
        elif not self.life.matches_config(backend):
            self.life.up_context = "rebind"
            await self.life.detach("the configuration changed", "rebind")
        elif (misplaced := self.driver.misplaced(backend, placement)) is not None:
            if placement.ready and self.driver.moves_by_swap:
                await self.life.swap(placement, f"rebind: {misplaced}")
            else:
                await self.life.detach(misplaced, "lower-lost")

    def find_lower(self) -> Link | None:
        return self._pick(self._matching_lowers())

    def _matching_lowers(self) -> list[Link]:
        return matching_lowers(self.override or self.nic.lower, _Either(self.env.own_links(), self.nic.backend_names),
                               self.env.links, self._ready)

    def _pick(self, matches: list[Link]) -> Link | None:
        if len(matches) == 1:
            return matches[0]
        # A second match appearing under an attached NIC (a VLAN made on its
        # lower, say) must not tear the NIC down: it stays where it is.
        backend = self.backend
        current = [link for link in matches if backend is not None and link.index == backend.lower_ifindex]
        return current[0] if current else None

    def _ready(self, link: Link) -> bool:
        # With udevd, a link is used only once udev is done with it (renames).
        return not self.env.udev_gate or udev_initialized(link.index)

    async def remove(self) -> None:
        """The NIC left the config: take its backend out of QEMU and the kernel."""
        await teardown.remove(self.life)

    async def _serve_rebind(self, spec: LowerSpec, future: asyncio.Future[dict[str, Any]]) -> None:
        name = spec.name or "?"
        try:
            await self._rebind_now(spec)
        except NetwatchError as exc:
            current = self.backend.lower if self.backend else "no lower"
            kind = BadRebind if isinstance(exc, BadRequest) else RebindError
            if not future.done():
                future.set_exception(kind(f"cannot rebind {self.vm_name}/{self.nic.id} to {name}: {exc}; "
                                          f"it stays on {current}"))
            return
        if not future.done():
            future.set_result(self.status())

    async def _rebind_now(self, spec: LowerSpec) -> None:
        if not self.vm.connected:
            raise RebindError(f"QEMU of {self.vm_name} is not connected")
        target = find_lower(spec, set(), self.env.links, self._ready)
        if target is None:
            raise BadRebind(f"there is no link named {spec.name}")
        if target.name in self.env.own_links() | set(self.nic.backend_names):
            raise BadRebind(f"{target.name} is a netwatch backend")
        if target.flags & IFF_LOOPBACK:
            raise BadRebind(f"{target.name} is a loopback device")
        backend = self.backend
        previous, self.override = self.override, spec
        self.env.on_interest_change(self)
        try:
            if backend is None or backend.lower_ifindex == target.index:
                return  # the next pass attaches it there, or it is there already
            placement = self.driver.place(self.nic, target, self.env.links)
            if self.driver.moves_by_swap:
                await self.life.swap(placement, f"rebind to {target.name} requested")
            else:
                await self.driver.maintain(backend, placement, self.env.links, self.env.ops)
                self.life.follow_uplink(placement)
        except BaseException:
            self.override = previous
            raise

    # -- what it reports (netwatch/nic/report.py) -------------------------------

    def plan(self, nic: NicConfig) -> dict[str, str] | None:
        """What applying ``nic`` would do to this NIC (reload --dry-run), or None for nothing."""
        return report.plan(self, nic)

    def status(self) -> dict[str, Any]:
        return report.status(self)

    # -- names for messages -----------------------------------------------------

    def spec_name(self) -> str:
        spec = self.override or self.nic.lower
        return spec.describe() if spec else "-"

    def _lower_name(self) -> str | None:
        return self.lower.name if self.lower else (self.nic.lower.describe() if self.nic.lower else None)


class _Either:
    """Names in either collection, without building their union (every NIC's pass asks: that was O(NICs))."""

    def __init__(self, first: Container[str], second: Container[str]) -> None:
        self.first, self.second = first, second

    def __contains__(self, name: object) -> bool:
        return name in self.first or name in self.second
