"""The service shell: wires events in, the reconciler and actions out together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from tenacity.wait import wait_base

from . import events
from .config import Config
from .control import ControlServer
from .errors import NetwatchError
from .hooks import HookRunner
from .linkops import LinkOps
from .links import LinkMonitor, LinkTable
from .nic import NicEnv
from .reconciler import Reconciler
from .records import RecordStore
from .udev import UdevMonitor, resolve_source

log = logging.getLogger(__name__)


class Service:
    """``netwatch run``: everything lives inside :meth:`run`'s context stack."""

    def __init__(self, config: Config, connect_wait: wait_base | None = None,
                 retry_wait: wait_base | None = None) -> None:
        self.config = config
        self.connect_wait = connect_wait
        self.retry_wait = retry_wait
        self.reconciler: Reconciler | None = None
        self._stop = asyncio.Event()
        self._refresh: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    async def run(self) -> None:
        settings = self.config.settings
        os.makedirs(settings.state_dir, mode=0o755, exist_ok=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        table = LinkTable()
        source = resolve_source(settings.udev)
        async with contextlib.AsyncExitStack() as stack:
            ops = await stack.enter_async_context(LinkOps())
            hooks = await stack.enter_async_context(HookRunner(settings.hooks_dir, settings.hook_timeout))
            env = NicEnv(links=table, ops=ops, records=RecordStore(settings.state_dir), hooks=hooks,
                         node_dir=os.path.join(settings.state_dir, "dev"), udev_gate=source == "udev",
                         retry_wait=self.retry_wait)
            reconciler = Reconciler(self.config, env, connect_wait=self.connect_wait)
            self.reconciler = reconciler
            links = await stack.enter_async_context(
                LinkMonitor(table, reconciler.on_link_change, reconciler.kick_all))
            if source is not None:
                await stack.enter_async_context(
                    UdevMonitor(source, reconciler.on_uevent, lambda: self._resync(links)))
            await stack.enter_async_context(reconciler)
            await stack.enter_async_context(ControlServer(settings.state_dir, {"status": self._status}))
            nics = len(reconciler.all_nics())
            events.emit("service", f"netwatch running: {len(self.config.vms)} VMs, {nics} NICs, "
                        f"uevents from {source or 'nowhere'}")
            stop = asyncio.create_task(self._stop.wait())
            assert links.failed is not None
            waiters: set[asyncio.Future[Any]] = {stop, links.failed}
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            # A shutdown that hangs says where, instead of waiting for SIGKILL.
            loop.call_later(5.0, _report_stuck_tasks)
            if links.failed in done:
                self._failure = links.failed.exception()
            if self._failure is not None:
                # Exit non-zero: systemd restarts netwatch, which resyncs from scratch.
                raise NetwatchError(f"following host links failed: {self._failure}") from self._failure
            events.emit("service", "netwatch stopping; backends stay in place for the next start")

    def _resync(self, links: LinkMonitor) -> None:
        if self._refresh is not None and not self._refresh.done():
            return  # one refresh at a time covers every overflow so far
        self._refresh = asyncio.get_running_loop().create_task(links.refresh("uevent overflow"))
        self._refresh.add_done_callback(self._refresh_done)

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failure = task.exception()
            self._stop.set()

    async def _status(self, request: dict[str, Any]) -> Any:
        assert self.reconciler is not None
        return self.reconciler.status()


def _report_stuck_tasks() -> None:
    import io
    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(file=out)
        log.warning("shutdown is taking long; task %s is at:\n%s", task.get_name(), out.getvalue())
