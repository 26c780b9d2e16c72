"""Actions out: ifup/ifdown hooks, best effort by design.

Executables in ``<hooks_dir>/if-up.d/`` and ``if-down.d/`` run in run-parts
order (names of ``[A-Za-z0-9_-]`` only), without a shell, with arguments
``<backend ifname> <context>`` and a minimal environment. Each NIC has its
own queue, so one NIC's hooks run in order (a down before the next up) while
a slow or hanging hook never delays another NIC or the attach itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections import Counter
from dataclasses import dataclass

from netwatch import events, tasks
from netwatch.nic.records import NicRecord

log = logging.getLogger(__name__)

UP_CONTEXTS = ("start", "reattach", "rebind", "hot-add", "migrate-in")
DOWN_CONTEXTS = ("lower-lost", "rebind", "stop", "hot-remove", "migrate-out", "migrate-failed")
_NAME = re.compile(r"[A-Za-z0-9_-]+\Z")
STDERR_TAIL = 2000
HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A NIC that keeps flapping while its hooks hang must not queue without end.
QUEUE_LIMIT = 64


@dataclass(frozen=True)
class HookCall:
    direction: str  # "up" or "down"
    context: str
    record: NicRecord
    delay: float = 0.0  # seconds to wait before running (the NIC's later hooks wait behind it)


def hook_env(call: HookCall) -> dict[str, str]:
    """Everything a hook is told; nothing inherited from netwatch's environment."""
    record = call.record
    return {
        "PATH": HOOK_PATH,
        "NETWATCH_VM": record.vm,
        "NETWATCH_NIC": record.nic,
        "INTERFACE": record.ifname,
        "LOWER": record.lower,
        "MAC": record.mac,
        "MODE": record.mode,
        "BACKEND": record.backend,
        "BRIDGE": record.bridge or "",
        "CONTEXT": call.context,
    }


def list_hooks(directory: str) -> list[str]:
    """run-parts order: valid names, executable regular files, C-locale sorted."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot list hooks in %s: %s", directory, exc)
        return []
    found = []
    for name in names:
        path = os.path.join(directory, name)
        if _NAME.match(name) and os.path.isfile(path) and os.access(path, os.X_OK):
            found.append(path)
    return found


def _has_entries(directory: str) -> bool:
    try:
        with os.scandir(directory) as entries:
            return next(entries, None) is not None
    except FileNotFoundError:
        return False
    except OSError:
        return True  # list_hooks() says why, when the call runs


class HookRunner:
    """Runs hooks per NIC in order; owns one task per NIC with pending hooks."""

    def __init__(self, hooks_dir: str, timeout: float) -> None:
        self.hooks_dir = hooks_dir
        self.timeout = timeout
        self._queues: dict[tuple[str, str], asyncio.Queue[HookCall]] = {}
        self._workers: dict[tuple[str, str], asyncio.Task[None]] = {}
        # (VM, NIC) -> hook runs that failed, timed out or were dropped (a metric).
        self.failures: Counter[tuple[str, str]] = Counter()

    async def __aenter__(self) -> HookRunner:
        if sys.version_info < (3, 12):
            # 3.11's default child watcher waits in a thread per process; a
            # pidfd watcher keeps everything on the one event loop.
            watcher = asyncio.PidfdChildWatcher()
            watcher.attach_loop(asyncio.get_running_loop())
            asyncio.set_child_watcher(watcher)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await tasks.stop(list(self._workers.values()))
        self._workers.clear()

    def submit(self, direction: str, context: str, record: NicRecord, delay: float = 0.0) -> None:
        assert context in (UP_CONTEXTS if direction == "up" else DOWN_CONTEXTS), context
        if not _has_entries(os.path.join(self.hooks_dir, f"if-{direction}.d")):
            # Nothing to run, now or when a queued call's turn comes: no task
            # per NIC (with 256 NICs reattaching at once, that was measurable).
            return
        key = (record.vm, record.nic)
        queue = self._queues.setdefault(key, asyncio.Queue(QUEUE_LIMIT))
        if queue.full():
            self.failures[key] += 1
            events.emit("hook-failed", f"dropping if-{direction} hooks ({context}): {queue.qsize()} hook runs "
                        "are still queued for this NIC", vm=record.vm, nic=record.nic, lower=record.lower)
            return
        queue.put_nowait(HookCall(direction, context, record, delay))
        worker = self._workers.get(key)
        if worker is None or worker.done():
            self._workers[key] = asyncio.create_task(self._work(queue), name=f"netwatch-hooks-{key[0]}-{key[1]}")

    async def idle(self) -> None:
        """Wait until every queued hook has run (for tests and shutdown)."""
        for queue in list(self._queues.values()):
            await queue.join()

    async def _work(self, queue: asyncio.Queue[HookCall]) -> None:
        while not queue.empty():
            call = await queue.get()
            try:
                if call.delay:
                    await asyncio.sleep(call.delay)
                for path in list_hooks(os.path.join(self.hooks_dir, f"if-{call.direction}.d")):
                    await self._run_one(path, call)
            finally:
                queue.task_done()

    async def _run_one(self, path: str, call: HookCall) -> None:
        record = call.record
        try:
            proc = await asyncio.create_subprocess_exec(
                path, record.ifname, call.context, env=hook_env(call), cwd="/", stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            self._failed(call, path, f"could not start: {exc.strerror or exc}")
            return
        assert proc.stderr is not None
        tail = bytearray()

        async def collect() -> None:
            assert proc.stderr is not None
            while chunk := await proc.stderr.read(4096):
                tail.extend(chunk)
                del tail[:-STDERR_TAIL]

        reader = asyncio.create_task(collect())
        try:
            async with asyncio.timeout(self.timeout):
                await proc.wait()
                await reader
        except TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            await tasks.stop([reader])
            self._failed(call, path, f"did not finish within {self.timeout:g} s and was killed", stderr=_text(tail))
            return
        except asyncio.CancelledError:
            _kill_group(proc.pid)
            raise
        if proc.returncode != 0:
            status = (f"was killed by signal {-proc.returncode}" if proc.returncode and proc.returncode < 0
                      else f"exited with status {proc.returncode}")
            self._failed(call, path, f"{status}: {_text(tail)[-300:]}", status=proc.returncode, stderr=_text(tail))
        else:
            log.debug("hook %s (%s) for %s/%s succeeded", path, call.context, record.vm, record.nic)

    def _failed(self, call: HookCall, path: str, what: str, status: int | None = None, stderr: str = "") -> None:
        record = call.record
        self.failures[(record.vm, record.nic)] += 1
        events.emit("hook-failed", f"if-{call.direction} hook {path} ({call.context}) {what}", vm=record.vm,
                    nic=record.nic, lower=record.lower or None, hook=path, context=call.context, status=status,
                    stderr=stderr)


def _kill_group(pid: int) -> None:
    # The hook may have started children; they go with it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _text(data: bytes | bytearray) -> str:
    return bytes(data).decode("utf-8", "replace").strip()
