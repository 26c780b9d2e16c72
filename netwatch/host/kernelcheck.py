"""Whether the running kernel can do the redirect wiring, asked of the kernel itself.

A redirect NIC needs ``tun`` (its persistent tap), ``macvlan`` (on the
lower), ``sch_ingress``, ``cls_u32`` and ``act_mirred`` (the two filters).
Built in or modules, under any config name a distribution picked: the one
sure test is to make each thing once. That is done in a child process,
in a network namespace of its own (a user namespace too when netwatch
lacks CAP_SYS_ADMIN): nothing it makes is ever seen on the host, and all
of it goes with the child. Modules the kernel loads on the way stay
loaded, as they would for the first redirect NIC.

The child is forked, not started from a file: it runs the encoders netwatch
uses (tc.py, rtnl.py) and needs no interpreter start-up. It writes one line
per answer, and is killed when it has not finished in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from netwatch.host import ptap, rtnl, tc

CHECK_TIMEOUT = 5.0
KILL_GRACE = 1.0  # a killed child blocked in the kernel (waiting for the rtnl lock) dies when it gets it
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
ANSWER_TIMEOUT = 3.0  # the child's own bound on each request; the parent's deadline covers all of them

# Each module, the kernel option that provides it, and what the kernel
# answers when it has no such thing: the errno, and the extended-ack
# sentence of kernels that give one (older ones give the errno alone).
MODULES: dict[str, str] = {
    "tun": "CONFIG_TUN",
    "macvlan": "CONFIG_MACVLAN",
    "sch_ingress": "CONFIG_NET_SCH_INGRESS",
    "cls_u32": "CONFIG_NET_CLS_U32",
    "act_mirred": "CONFIG_NET_ACT_MIRRED",
}
ABSENT: dict[str, tuple[frozenset[int], frozenset[str]]] = {
    # /dev/net/tun missing (ENOENT), or no driver behind the node (ENODEV, ENXIO): no sentence.
    "tun": (frozenset({errno.ENOENT, errno.ENODEV, errno.ENXIO}), frozenset()),
    "macvlan": (frozenset({errno.EOPNOTSUPP}), frozenset({"Unknown device type"})),
    "sch_ingress": (frozenset({errno.ENOENT}), frozenset({"Specified qdisc kind is unknown",
                                                         "Specified qdisc not found"})),
    "cls_u32": (frozenset({errno.ENOENT}), frozenset({"TC classifier not found"})),
    "act_mirred": (frozenset({errno.ENOENT}), frozenset({"Failed to load TC action module"})),
}
# What must work before a module can be tried: a macvlan needs an ethernet
# lower (a tap; an empty namespace has only lo), a u32 filter a qdisc.
NEEDS = {"macvlan": "tun", "cls_u32": "sch_ingress"}
NAMESPACE = "netns"  # the probe's first step: a namespace to work in
FAILED = "failed"  # the probe itself raised (its message says what)


@dataclass(frozen=True)
class Probe:
    """One thing tried in the throwaway namespace, and what the kernel said."""

    step: str  # a module of MODULES, or NAMESPACE
    errno: int  # 0: it was made
    message: str | None = None  # the kernel's extended-ack sentence


@dataclass(frozen=True)
class KernelSupport:
    """What the running kernel lacks of the redirect wiring's modules."""

    missing: tuple[str, ...] = ()  # modules the kernel said it has not
    unchecked: tuple[str, ...] = ()  # modules the check could not tell about
    why_unchecked: str = ""

    def sentences(self, needed: Collection[str] = tuple(MODULES)) -> list[str]:
        """One sentence per missing module of ``needed``, and one for those that could not be checked."""
        said = [f"the kernel has no {module} ({MODULES[module]})" for module in self.missing if module in needed]
        unknown = [module for module in self.unchecked if module in needed]
        if unknown:
            said.append(f"could not check whether the kernel has {', '.join(unknown)}: {self.why_unchecked}")
        return said


def judge(probes: Iterable[Probe], finished: bool = True) -> KernelSupport:
    """The kernel's answers (in the order they came) read as modules present, missing or unknown.

    A module counts as missing only on the answer its absence gives: its
    errno, with its own sentence or none. Any other refusal leaves it
    unknown, with the kernel's words. ``finished``: False when the child
    was stopped before it tried everything.
    """
    said = {probe.step: probe for probe in probes}
    namespace = said.get(NAMESPACE)
    if namespace is None or namespace.errno:
        why = ("the check was stopped before it began" if namespace is None else
               f"no network namespace to test in: {_words(namespace)}")
        return KernelSupport(unchecked=tuple(MODULES), why_unchecked=why)
    missing: list[str] = []
    reasons: dict[str, list[str]] = {}  # why -> the modules it kept unchecked
    for module in MODULES:
        probe = said.get(module)
        if probe is None:
            prerequisite = NEEDS.get(module)
            if prerequisite is not None and prerequisite in said and said[prerequisite].errno:
                why = f"it needs {prerequisite}"
            elif FAILED in said:
                why = f"the check failed: {said[FAILED].message}"
            else:
                why = "the check was stopped before it was tried" if not finished else "it was not tried"
            reasons.setdefault(why, []).append(module)
            continue
        if not probe.errno:
            continue
        errnos, messages = ABSENT[module]
        if probe.errno in errnos and (probe.message is None or probe.message in messages):
            missing.append(module)
        else:
            reasons.setdefault(f"the kernel said {_words(probe)}", []).append(module)
    unchecked = tuple(module for modules in reasons.values() for module in modules)
    return KernelSupport(tuple(missing), unchecked,
                         "; ".join(f"{', '.join(modules)}: {why}" for why, modules in reasons.items()))


def _words(probe: Probe) -> str:
    strerror = os.strerror(probe.errno)
    return f"{probe.message} ({strerror})" if probe.message else strerror


async def check_kernel(timeout: float = CHECK_TIMEOUT) -> KernelSupport:
    """Ask the running kernel which of MODULES it lacks; nothing changes on the host.

    As a user other than root the answer is that nothing could be checked.
    The child doing it is killed after ``timeout`` seconds.
    """
    if os.geteuid() != 0:
        return KernelSupport(unchecked=tuple(MODULES), why_unchecked="netwatch is not running as root")
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        return KernelSupport(unchecked=tuple(MODULES), why_unchecked=f"cannot fork: {exc.strerror or exc}")
    if pid == 0:
        _child(read_end, write_end)  # never returns
    os.close(write_end)
    pidfd: int | None = None
    finished = False
    try:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            return KernelSupport(unchecked=tuple(MODULES), why_unchecked=f"cannot watch the check's process: "
                                 f"{exc.strerror or exc}")
        finished = await _exited(loop, pidfd, timeout)
        if not finished:
            os.kill(pid, signal.SIGKILL)  # not reaped yet: the pid is still this child's
            await _exited(loop, pidfd, KILL_GRACE)
    finally:
        if not finished:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # cancelled, or pidfd_open failed
        _reap(loop, pid, pidfd)
        output = _read_all(read_end)
        os.close(read_end)
    return judge(_parse(output), finished)


async def _exited(loop: asyncio.AbstractEventLoop, pidfd: int, timeout: float) -> bool:
    """Whether the process of ``pidfd`` exits within ``timeout`` seconds."""
    exited: asyncio.Future[None] = loop.create_future()
    loop.add_reader(pidfd, lambda: None if exited.done() else exited.set_result(None))
    try:
        async with asyncio.timeout(timeout):
            await exited
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)


def _reap(loop: asyncio.AbstractEventLoop, pid: int, pidfd: int | None) -> None:
    """Collect the child's exit status now, or when it exits (a process blocked in the kernel dies late)."""
    if pidfd is None:
        os.waitpid(pid, 0)  # killed already; without a pidfd there is no way to wait for it on the loop
        return
    if os.waitpid(pid, os.WNOHANG)[0] == pid:
        os.close(pidfd)
        return

    def reap() -> None:
        loop.remove_reader(pidfd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        os.close(pidfd)
    loop.add_reader(pidfd, reap)


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break  # a killed child that has not died yet still holds the write end
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(output: bytes) -> list[Probe]:
    probes = []
    for line in output.splitlines():
        try:
            step, number, message = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill
        if step in MODULES or step in (NAMESPACE, FAILED):
            probes.append(Probe(str(step), int(number), str(message) if message is not None else None))
    return probes


def _child(read_end: int, write_end: int) -> None:
    """The forked child: try everything in a namespace of its own, one line per answer, then exit."""
    status = 1
    try:
        # Signals meant for netwatch must not wake its loop through the inherited wakeup fd.
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        os.close(read_end)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        try:
            for step, number, message in _probe(libc):
                os.write(write_end, json.dumps([step, number, message]).encode() + b"\n")
        except Exception as exc:  # noqa: BLE001 - the parent is told what, and reads the rest as unchecked
            os.write(write_end, json.dumps([FAILED, 0, f"{type(exc).__name__}: {exc}"]).encode() + b"\n")
        status = 0
    finally:
        os._exit(status)  # never back into netwatch's code (its loop, its finally blocks)


def _probe(libc: ctypes.CDLL) -> Iterable[tuple[str, int, str | None]]:
    """Each step's (name, errno, kernel message), as it is done; stops at the first step nothing can follow."""
    # Without CAP_SYS_ADMIN (a service's bounding set) a user namespace gives a network namespace all the same.
    if libc.unshare(CLONE_NEWNET) != 0 and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        yield NAMESPACE, ctypes.get_errno(), None
        return
    yield NAMESPACE, 0, None
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    with contextlib.suppress(OSError):
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
    sock.bind((0, 0))
    try:
        # A tap held by this process only (not persistent): it goes when the child exits.
        tap = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(tap, ptap.TUNSETIFF, struct.pack("16sH22x", b"nwk0", ptap.IFF_TAP | ptap.IFF_NO_PI))
    except OSError as exc:
        yield "tun", exc.errno or 0, None
    else:
        yield "tun", 0, None
        lower = socket.if_nametoindex("nwk0")
        yield "macvlan", *_ask(sock, rtnl.newlink_macvlan(1, "nwk1", lower, "02:00:00:00:00:01", "bridge"))
    loopback = socket.if_nametoindex("lo")
    ingress = _ask(sock, tc.add_ingress(2, loopback))
    yield "sch_ingress", *ingress
    u32 = _ask(sock, tc.match_all_filter(3, loopback)) if not ingress[0] else None
    if u32 is not None:
        yield "cls_u32", *u32
    if u32 is not None and not u32[0]:
        # As the wiring has it: the filter, now with its redirect.
        yield "act_mirred", *_ask(sock, tc.redirect_filter(4, loopback, loopback, replace=True))
    else:
        # An action of its own (needs CAP_NET_ADMIN of the host's user namespace, not the namespace's).
        yield "act_mirred", *_ask(sock, tc.standalone_redirect(4, loopback))


def _ask(sock: socket.socket, request: bytes) -> tuple[int, str | None]:
    sock.send(request)
    ready, _, _ = select.select([sock], [], [], ANSWER_TIMEOUT)
    if not ready:
        return errno.ETIMEDOUT, "the kernel did not answer"
    for _seq, number, message in rtnl.acks(sock.recv(65536)):
        return number, message
    return errno.EBADMSG, "the kernel's answer had no acknowledgement in it"
