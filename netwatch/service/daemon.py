"""The service shell: wires events in, the reconciler and actions out together,
and speaks to systemd (readiness, watchdog, status) and to the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import stat
import time
from collections.abc import Callable
from typing import Any

from tenacity.wait import wait_base

from netwatch import config as config_mod
from netwatch import events, tasks
from netwatch.config import Config, NicConfig
from netwatch.errors import BadRequest, ConfigError, LinkError, NetwatchError
from netwatch.host import kernelcheck
from netwatch.host.kernelcheck import KernelSupport
from netwatch.host.linkops import LinkOps
from netwatch.host.links import LinkMonitor, LinkTable
from netwatch.host.linkstats import dump_counters
from netwatch.host.udev import UdevMonitor, UdevReadiness, resolve_source
from netwatch.nic.env import NicEnv
from netwatch.nic.records import RecordStore
from netwatch.qemu.unmonitored import STARTING_OPS
from netwatch.service.control import ControlServer
from netwatch.service.hooks import HookRunner
from netwatch.service.libvirthook import PREPARE_WAIT, event_from_request
from netwatch.service.metrics import MetricsWriter
from netwatch.service.notify import Notifier
from netwatch.service.reconciler import Reconciler

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0
# Seconds the traffic counters shown by status and the metrics may be old.
COUNTERS_MAX_AGE = 1.0
# How long a libvirt hook's answer may wait for a starting domain's taps: within the hook's own bound.
LIBVIRT_TAP_WAIT = PREPARE_WAIT - 2.0


class Service:
    """``netwatch run``: everything lives inside :meth:`run`'s context stack."""

    def __init__(self, config: Config, connect_wait: wait_base | None = None,
                 retry_wait: wait_base | None = None, notifier: Notifier | None = None) -> None:
        self.config = config
        self.connect_wait = connect_wait
        self.retry_wait = retry_wait
        self.notifier = notifier or Notifier()
        self.reconciler: Reconciler | None = None
        self.links: LinkMonitor | None = None
        self._stop = asyncio.Event()
        self._refresh: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._status_pending = False
        self._ready = False
        self._background: set[asyncio.Task[Any]] = set()
        self._reload_lock = asyncio.Lock()
        self.env: NicEnv | None = None
        self.metrics: MetricsWriter | None = None
        self._counters_read = float("-inf")
        # What the last kernel check found (None: none made, no NIC is redirect-wired).
        self.kernel: KernelSupport | None = None

    async def run(self) -> None:
        settings = self.config.settings
        _own_directory(settings.state_dir)
        # Before any NIC's first pass: one that cannot be served is failed from the start, with why.
        await self._check_kernel(self.config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        table = LinkTable()
        source = resolve_source(settings.udev)
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self.notifier.close)
            ops = await stack.enter_async_context(LinkOps())
            hooks = await stack.enter_async_context(HookRunner(settings.hooks_dir, settings.hook_timeout))
            readiness = UdevReadiness() if source == "udev" else None
            env = NicEnv(links=table, ops=ops, records=RecordStore(settings.state_dir), hooks=hooks,
                         node_dir=settings.node_dir, lower_ready=readiness,
                         retry_wait=self.retry_wait, on_state_change=self._status_changed,
                         unplug_timeout=settings.unplug_timeout,
                         migration_handover=settings.migration_handover, refusal=self._refusal)
            self.env = env
            reconciler = Reconciler(self.config, env, connect_wait=self.connect_wait)
            self.reconciler = reconciler
            if source is not None:
                # Listening before the links are read: a link made meanwhile has its uevents still to come.
                await stack.enter_async_context(
                    UdevMonitor(source, self._uevent_handler(readiness, reconciler.on_uevent),
                                lambda: self._resync(readiness)))
            links = await stack.enter_async_context(
                LinkMonitor(table, reconciler.on_link_change, reconciler.kick_all, rcvbuf=settings.netlink_rcvbuf))
            self.links = links
            if readiness is not None:
                readiness.prime(link.index for link in table)
            await stack.enter_async_context(reconciler)
            if settings.metrics_file is not None:
                self.metrics = await stack.enter_async_context(MetricsWriter(settings.metrics_file, self._collect))
            await stack.enter_async_context(ControlServer(settings.state_dir, {
                "status": self._status, "rebind": self._rebind, "reload": self._reload,
                "libvirt-hook": self._libvirt_hook}, settings.control_group, root_only={"libvirt-hook"}))
            self._start(self._watchdog(), "netwatch-watchdog")
            self._start(self._announce_ready(), "netwatch-ready")
            # Evaluated at exit: tasks started later (reloads) are stopped too.
            stack.push_async_callback(lambda: tasks.stop(list(self._background)))
            events.emit("service", f"netwatch running: {len(self.config.vms)} VMs, "
                        f"{len(reconciler.all_nics())} NICs, uevents from {source or 'nowhere'}")
            assert links.failed is not None
            stop = asyncio.create_task(self._stop.wait())
            waiters: set[asyncio.Future[Any]] = {stop, links.failed}
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            self.notifier.send(STOPPING="1")
            # A shutdown that hangs says where, instead of waiting for SIGKILL.
            loop.call_later(5.0, _report_stuck_tasks)
            if links.failed in done:
                self._failure = links.failed.exception()
            if self._failure is not None:
                # Exit non-zero: systemd restarts netwatch, which resyncs from scratch.
                raise NetwatchError(f"following host links failed: {self._failure}") from self._failure
            events.emit("service", "netwatch stopping; backends stay in place for the next start")

    def _start(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- systemd ----------------------------------------------------------------

    async def _announce_ready(self) -> None:
        """READY=1 once links are dumped and every NIC has made its first pass."""
        assert self.reconciler is not None
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await self.reconciler.settled()
        except TimeoutError:
            log.warning("not every NIC settled within %g s; reporting ready anyway", READY_TIMEOUT)
        self._ready = True
        self.notifier.ready(self.reconciler.summary())

    async def _watchdog(self) -> None:
        # Pinged from the event loop itself: a stuck loop stops the pings.
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _status_changed(self) -> None:
        if self.metrics is not None:
            self.metrics.changed()
        # Coalesce a burst of NIC transitions into one STATUS= update.
        if self._status_pending or not self.notifier.enabled:
            return
        self._status_pending = True
        asyncio.get_running_loop().call_soon(self._send_status)

    def _send_status(self) -> None:
        self._status_pending = False
        if self.reconciler is not None and self._ready:
            self.notifier.status(self.reconciler.summary())

    # -- requests -------------------------------------------------------------

    async def _status(self, request: dict[str, Any]) -> Any:
        return await self._collect()

    async def _collect(self) -> dict[str, Any]:
        """Everything status and the metrics show, traffic counters read afresh."""
        assert self.reconciler is not None and self.env is not None
        now = time.monotonic()
        backends = {nic.backend.ifindex for nic in self.reconciler.all_nics() if nic.backend is not None}
        if now - self._counters_read >= COUNTERS_MAX_AGE or not backends <= self.env.counters.keys():
            # Only the backends' links, and at most once a second unless a new
            # backend has none yet: a status poll must not cost a busy host a
            # dump of every link each time.
            try:
                self.env.counters = await dump_counters(backends)
                self._counters_read = now
            except LinkError as exc:
                log.warning("%s; status shows the last counters read", exc)
        status = self.reconciler.status()
        # For watching resource use from outside: all of it should stay flat.
        status["service"] = {"pid": os.getpid(), "tasks": len(asyncio.all_tasks()),
                             "link_resyncs": self.links.resyncs if self.links else 0, "links": len(self.links.table)
                             if self.links else 0}
        return status

    async def _libvirt_hook(self, request: dict[str, Any]) -> Any:
        """libvirt's qemu hook (netwatch/service/libvirthook.py): the domain's VMs follow it."""
        assert self.reconciler is not None
        event = event_from_request(request)
        result = self.reconciler.libvirt_event(event)
        if event.op in STARTING_OPS and event.subop == "begin":
            # QEMU opens its taps right after: the hook, and libvirt, wait for them (bounded).
            result["missing"] = await self.reconciler.taps_ready(result["vms"], LIBVIRT_TAP_WAIT)
        return result

    async def _rebind(self, request: dict[str, Any]) -> Any:
        assert self.reconciler is not None
        vm, nic, lower = (request.get(key) for key in ("vm", "nic", "lower"))
        if not all(isinstance(value, str) and value for value in (vm, nic, lower)):
            raise BadRequest("rebind needs string 'vm', 'nic' and 'lower'")
        assert isinstance(vm, str) and isinstance(nic, str) and isinstance(lower, str)
        return await self.reconciler.nic(vm, nic).rebind(lower)

    async def _reload(self, request: dict[str, Any]) -> Any:
        if request.get("dry_run") is True:
            assert self.reconciler is not None
            new = config_mod.load(self.config.path)
            refused = self.reconciler.refused_settings(new)
            if refused:
                raise ConfigError(refused)
            return {"plan": self.reconciler.plan(new)}
        # A task of its own: the request may time out or its client go away,
        # but a reload once begun is applied whole, never cut off half-way.
        async def locked() -> Any:
            async with self._reload_lock:
                return await self._reload_locked()
        task = asyncio.get_running_loop().create_task(locked(), name="netwatch-reload")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def _reload_locked(self) -> Any:
        assert self.reconciler is not None
        self.notifier.send(RELOADING="1")
        try:
            new = config_mod.load(self.config.path)
            if self._kernel_check_due(new):
                await self._check_kernel(new)
            result = await self.reconciler.reload(new)
            self.config = new
            return result
        except ConfigError as exc:
            events.emit("error", f"reload refused, the running configuration stays: {exc}")
            raise
        finally:
            self.notifier.send(READY="1", STATUS=self.reconciler.summary())

    # -- the kernel ---------------------------------------------------------------

    async def _check_kernel(self, config: Config) -> None:
        """Ask the kernel whether it has what ``config``'s NICs' wirings need; no check when none needs any."""
        needed = {module for vm in config.vms for nic in vm.nics for module in modules_needed(nic)}
        if not needed:
            return
        support = await kernelcheck.check_kernel()
        self.kernel = support
        unknown = tuple(module for module in support.unchecked if module in needed)
        if unknown:
            # Served as if it had them: a NIC that then fails says so in the kernel's own words.
            said = KernelSupport(unchecked=unknown, why_unchecked=support.why_unchecked).sentences()[0]
            # Under systemd (which sets INVOCATION_ID) the likely cause is the unit's sandbox: say what lifts it.
            hint = (" (the unit's drop-in for them, netwatch-redirect.conf, allows the check)"
                    if os.environ.get("INVOCATION_ID") else "")
            events.emit("service", f"{said}; redirect-wired NICs are served as if it had{hint}",
                        level=logging.WARNING)
        elif not support.missing:
            events.emit("service", f"the kernel has what wiring = \"redirect\" needs: {', '.join(kernelcheck.MODULES)}")
        # What it lacks is said by each NIC that needs it (NicEnv.refusal): failed, with the module named.

    def _kernel_check_due(self, new: Config) -> bool:
        """Whether a reload to ``new`` asks the kernel again: a NIC newly redirect-wired, or the last answer
        lacked something (a module loaded since serves the NICs it kept failed)."""
        if self.kernel is not None and (self.kernel.missing or self.kernel.unchecked):
            return True
        running = {(vm.name, nic.id) for vm in self.config.vms for nic in vm.nics if modules_needed(nic)}
        return any(modules_needed(nic) and (vm.name, nic.id) not in running for vm in new.vms for nic in vm.nics)

    def _refusal(self, nic: NicConfig) -> str | None:
        """Why ``nic`` cannot be served on this kernel (NicEnv.refusal), or None."""
        if self.kernel is None:
            return None
        return refusal(nic, self.kernel)

    def _reload_on_signal(self) -> None:
        async def reload() -> None:
            with contextlib.suppress(NetwatchError):  # already logged by _reload
                await self._reload({})
        self._start(reload(), "netwatch-sighup-reload")

    @staticmethod
    def _uevent_handler(readiness: UdevReadiness | None,
                        on_uevent: Callable[[str, str, int | None], None]) -> Callable[[str, str, int | None], None]:
        if readiness is None:
            return on_uevent

        def handle(action: str, name: str, ifindex: int | None) -> None:
            readiness.on_event(action, name, ifindex)
            on_uevent(action, name, ifindex)
        return handle

    def _resync(self, readiness: UdevReadiness | None) -> None:
        if self._refresh is not None and not self._refresh.done():
            return  # one refresh at a time covers every overflow so far
        if self.links is None:
            return  # the first read of the links is still to come
        self._refresh = asyncio.get_running_loop().create_task(self._refresh_after_overflow(self.links, readiness))
        self._refresh.add_done_callback(self._refresh_done)

    async def _refresh_after_overflow(self, links: LinkMonitor, readiness: UdevReadiness | None) -> None:
        await links.refresh("uevent overflow")
        if readiness is not None:
            # udevd's events for these may be among those lost: their database entries decide.
            readiness.prime(link.index for link in links.table)

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failure = task.exception()
            self._stop.set()


def modules_needed(nic: NicConfig) -> tuple[str, ...]:
    """The kernel modules (netwatch/host/kernelcheck.py) ``nic``'s wiring needs beyond what every wiring has."""
    # Only the redirect wiring: hub and direct need tun and macvtap, which the unit loads before it starts.
    return tuple(kernelcheck.MODULES) if nic.wiring == "redirect" else ()


def refusal(nic: NicConfig, support: KernelSupport) -> str | None:
    """One sentence per module ``nic`` needs and the kernel lacks, or None (unknown is not lacking)."""
    needed = modules_needed(nic)
    missing = [module for module in support.missing if module in needed]
    if not missing:
        return None
    said = "; ".join(KernelSupport(missing=tuple(missing)).sentences())
    return f"{said}: wiring = \"{nic.wiring}\" needs {'it' if len(missing) == 1 else 'them'}"


def _own_directory(path: str) -> None:
    """Make ``path`` if needed and refuse one that others could write into.

    Runtime records (acted on at the next start) and the control socket
    live there: a directory another user can write to would let them plant
    either.
    """
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
        info = os.lstat(path)
    except OSError as exc:
        raise NetwatchError(f"cannot use the state directory {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise NetwatchError(f"the state directory {path} is not a directory")
    if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NetwatchError(f"the state directory {path} must be netwatch's own and writable by it alone "
                            f"(owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o})")


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Its outcome went to the request that started it, or (timed out) to the journal.
    if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), NetwatchError):
        log.error("reload failed", exc_info=task.exception())


def _report_stuck_tasks() -> None:
    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(file=out)
        log.warning("shutdown is taking long; task %s is at:\n%s", task.get_name(), out.getvalue())
