"""Actions out: metrics for Prometheus, as a file for node_exporter's textfile collector.

The unit opens no network socket, so netwatch serves no /metrics: it
writes ``metrics_file`` (``*.prom`` in the collector's directory), whole
and atomically (a temporary file renamed over it), when something changed
and at most every ``MIN_INTERVAL`` seconds; traffic counters are read again
every ``REFRESH`` seconds. Names follow Prometheus' conventions: the
``netwatch_`` prefix, base units, ``_total`` for counters, HELP and TYPE for
each. Label values (VM names, NIC ids, interface names) are config-checked
names, escaped all the same.

The collector's directory is often another account's (node_exporter's,
0755), and that account may plant anything there. netwatch never opens or
follows what it did not just make: the temporary file has a random name
and is made with ``O_CREAT|O_EXCL|O_NOFOLLOW|O_NONBLOCK`` (so a FIFO or
symlink planted there is refused at once, never opened or waited on), is
checked to be a regular file of its own, and is renamed over the final name
(rename replaces whatever is there without following it), all relative to
one directory fd. That fd is reached from ``/`` without following a symlink
another account could have made or swapped (a symlink is followed only in a
directory nobody but root and netwatch may write to). A directory writable by
group or others without the sticky bit is refused: anyone could replace the
file with their own numbers. Its owner can do that too, but it can only lie
to itself: node_exporter's account reads the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import stat
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from netwatch import events, tasks
from netwatch.errors import NetwatchError
from netwatch.nic.state import NicState

log = logging.getLogger(__name__)

MIN_INTERVAL = 0.25
REFRESH = 15.0

RUN_STATES = ("running", "paused", "inmigrate", "postmigrate", "finish-migrate", "prelaunch", "shutdown",
              "suspended", "internal-error", "io-error", "guest-panicked", "watchdog", "debug", "colo",
              "restore-vm", "save-vm")


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: object) -> str:
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


class _Families:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, object], float]]) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            text = repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))
            self.lines.append(f"{name}{_labels(**labels) if labels else ''} {text}")


def render(status: dict[str, Any]) -> str:
    """The exposition text for a ``status`` answer (what ``netwatch status --json`` shows)."""
    vms = status.get("vms", [])
    nics = [(vm, nic) for vm in vms for nic in vm.get("nics", [])]

    def per_nic(key: str, convert: Callable[[Any], float | None] = float) -> list[tuple[dict[str, object], float]]:
        samples = []
        for vm, nic in nics:
            value = nic.get(key)
            converted = convert(value) if value is not None else None
            if converted is not None:
                samples.append(({"vm": vm["name"], "nic": nic["id"]}, converted))
        return samples

    def counters(key: str) -> list[tuple[dict[str, object], float]]:
        return [({"vm": vm["name"], "nic": nic["id"], "ifname": nic["ifname"]}, nic[key])
                for vm, nic in nics if nic.get(key) is not None]

    out = _Families()
    out.family("netwatch_nic_state", "gauge", "1 for the NIC's current state, 0 for the others.",
               [({"vm": vm["name"], "nic": nic["id"], "state": state.value}, int(nic["state"] == state.value))
                for vm, nic in nics for state in NicState])
    out.family("netwatch_nic_lower_present", "gauge", "Whether the NIC's lower (or a tap's bridge) is present.",
               per_nic("lower_present", lambda value: float(bool(value))))
    out.family("netwatch_nic_guest_link_up", "gauge", "Whether the guest sees its NIC's link up.",
               per_nic("guest_link", lambda value: float(bool(value))))
    out.family("netwatch_nic_configured", "gauge", "Whether the NIC's if-up hooks ran (and its if-down is owed).",
               per_nic("configured", lambda value: float(bool(value))))
    out.family("netwatch_nic_swaps_total", "counter",
               "Backends made for the NIC: hub swaps and direct replugs, the first attach included.",
               per_nic("swaps"))
    out.family("netwatch_nic_last_attach_seconds", "gauge",
               "How long the NIC's last backend took to make and wire into QEMU.", per_nic("last_attach_seconds"))
    out.family("netwatch_nic_hook_failures_total", "counter", "Hook runs for the NIC that failed or timed out.",
               per_nic("hook_failures"))
    for key, name, what in (("rx_bytes", "receive_bytes", "Bytes"), ("tx_bytes", "transmit_bytes", "Bytes"),
                            ("rx_packets", "receive_packets", "Packets"),
                            ("tx_packets", "transmit_packets", "Packets")):
        direction = "received" if key.startswith("rx") else "transmitted"
        out.family(f"netwatch_backend_{name}_total", "counter",
                   f"{what} {direction} by the NIC's backend link, as the kernel counts them "
                   "(for a tap, transmit is towards the guest).", counters(key))
    out.family("netwatch_vm_connected", "gauge", "Whether netwatch has a QMP session with the VM's QEMU.",
               [({"vm": vm["name"]}, int(bool(vm.get("connected")))) for vm in vms])
    out.family("netwatch_vm_run_state", "gauge", "1 for the QEMU run state the VM is in, 0 for the others.",
               [({"vm": vm["name"], "state": state}, int(vm.get("run_state") == state))
                for vm in vms for state in RUN_STATES])
    out.family("netwatch_vm_qmp_errors_total", "counter",
               "QMP sessions with the VM's QEMU that failed, and commands it never answered.",
               [({"vm": vm["name"]}, vm.get("qmp_errors", 0)) for vm in vms])
    service = status.get("service", {})
    out.family("netwatch_link_resyncs_total", "counter",
               "Times the link table was rebuilt from a dump (netlink overflow, uevent loss).",
               [({}, service.get("link_resyncs", 0))])
    out.family("netwatch_qmp_errors_total", "counter", "QMP sessions that failed and commands never answered, all VMs.",
               [({}, sum(vm.get("qmp_errors", 0) for vm in vms))])
    return "\n".join(out.lines) + "\n"


class UnsafeMetricsDirectory(NetwatchError):
    """The metrics file's directory, or the way to it, could be swapped or written by others."""


# O_PATH: a directory on the way needs search permission only, as in a lookup by path.
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_MAX_SYMLINKS = 40  # the kernel's own limit on one lookup


def _writable_by_others(info: os.stat_result) -> bool:
    # Group-writable counts as others': netwatch cannot know the group's members.
    return bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def open_directory(path: str) -> int:
    """An fd of the directory ``path``, reached from ``/`` one name at a time.

    A symlink on the way is followed only where nobody but root and
    netwatch's user could have put it; one another account could have made
    (or swapped a directory for) is refused, so the file cannot be sent
    into a directory of that account's choosing.
    """
    parts = deque(path.split("/"))
    fd = os.open("/", _DIR_FLAGS)
    here, links = "/", 0
    try:
        while parts:
            part = parts.popleft()
            if part in ("", "."):
                continue
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                # O_NOFOLLOW|O_DIRECTORY on a symlink: ENOTDIR (or ELOOP), as for a file.
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP) or not stat.S_ISLNK(
                        os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise
                info = os.fstat(fd)
                if info.st_uid not in (0, os.geteuid()) or _writable_by_others(info):
                    raise UnsafeMetricsDirectory(
                        f"{os.path.join(here, part)} is a symlink in a directory others can write to "
                        "(give the real path)") from None
                links += 1
                if links > _MAX_SYMLINKS:
                    raise UnsafeMetricsDirectory(f"too many symlinks on the way to {path}") from None
                target = os.readlink(part, dir_fd=fd)
                parts.extendleft(reversed(target.split("/")))
                if not target.startswith("/"):
                    continue
                child, here = os.open("/", _DIR_FLAGS), "/"
            else:
                here = os.path.join(here, part)
            os.close(fd)
            fd = child
        info = os.fstat(fd)
        if _writable_by_others(info) and not info.st_mode & stat.S_ISVTX:
            raise UnsafeMetricsDirectory(
                f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):04o}) and not sticky, so "
                "anyone could replace the file (chmod go-w, or chmod +t)")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _create(dir_fd: int, name: str) -> tuple[int, str]:
    # O_EXCL: a name already there (planted, or the 1 in 2**64 clash) is never opened.
    for _ in range(3):
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(tmp, _TMP_FLAGS, 0o600, dir_fd=dir_fd), tmp
        except FileExistsError:
            continue
    raise UnsafeMetricsDirectory("three random temporary names in a row were taken")


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` by renaming a complete temporary file over it (the collector never sees half)."""
    directory, name = os.path.split(path)
    dir_fd = open_directory(directory)
    try:
        fd, tmp = _create(dir_fd, name)
        try:
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                    raise UnsafeMetricsDirectory(f"the temporary file made in {directory} is not netwatch's")
                # Readable by node_exporter's user whatever the umask (the unit's is 0077).
                os.fchmod(fd, 0o644)
                data = memoryview(text.encode())
                while data:
                    data = data[os.write(fd, data):]
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)


class MetricsWriter:
    """Keeps ``path`` up to date; an async context manager owning its task."""

    def __init__(self, path: str, collect: Callable[[], Awaitable[dict[str, Any]]],
                 min_interval: float = MIN_INTERVAL, refresh: float = REFRESH) -> None:
        self.path = path
        self.collect = collect
        self.min_interval, self.refresh = min_interval, refresh
        self.writes = 0
        self._changed = asyncio.Event()
        self._last = ""
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def changed(self) -> None:
        self._changed.set()

    async def __aenter__(self) -> MetricsWriter:
        self._task = asyncio.create_task(self._run(), name="netwatch-metrics")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await tasks.stop([self._task])

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh):
                    await self._changed.wait()
            self._changed.clear()
            await self.write_now()
            await asyncio.sleep(self.min_interval)

    async def write_now(self) -> None:
        text = render(await self.collect())
        if text == self._last:
            return
        try:
            write_atomically(self.path, text)
        except (OSError, UnsafeMetricsDirectory) as exc:
            # Logged once per outage: the collector keeps the last good file,
            # and no metrics are written until the cause is gone.
            if not self._failing:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                events.emit("error", f"cannot write metrics to {self.path}: {why}; netwatch keeps trying")
            self._failing = True
            return
        if self._failing:
            events.emit("service", f"metrics written to {self.path} again")
        self._failing = False
        self._last = text
        self.writes += 1
