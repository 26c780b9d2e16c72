"""A throwaway world for the demo, the tests and the benchmarks.

A network namespace with veth pairs (one end a VM's lower, the other the
"wire" a test sends and listens on), a QEMU started with netwatch's
arguments plus an observer port (a ``-netdev dgram`` on the NIC's hub that
sees what the guest NIC would receive and injects what it would send), and
a netwatch service inside the namespace. Everything is removed on exit;
processes are ended by the pid this module started them with.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from netwatch.config import VmConfig
from netwatch.qemu.args import vm_args

CLONE_NEWNET = 0x40000000
ETH_P_TEST = 0x88B5  # IEEE "local experimental" ethertype: nobody else's traffic
QEMU_BINARY = "qemu-system-x86_64"
OBSERVER_QUEUE = 4096

T = TypeVar("T")


def _die_with_parent() -> None:
    """In a child before exec: be killed if the process that started it dies."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that cleanup code runs."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def sh(*args: str, check: bool = True) -> str:
    result = subprocess.run(args, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


class Deadline(AssertionError):
    """A condition did not become true in time."""


def wait_until(condition: Callable[[], T], timeout: float, what: str,
               dump: Callable[[], str] | None = None, interval: float = 0.01) -> T:
    """Poll ``condition`` until it returns something truthy; raise with a dump if not in time."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise Deadline(f"timed out after {timeout:g} s waiting for {what}" + (f"\n{dump()}" if dump else ""))
        time.sleep(interval)


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0, interval: float = 0.01) -> None:
    """wait_until for a test inside an event loop: awaits between polls."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(interval)
    except TimeoutError:
        raise Deadline(f"timed out after {timeout:g} s waiting for {what}") from None


class Netns:
    """A named network namespace, deleted on exit."""

    def __init__(self, prefix: str = "nwt") -> None:
        self.name = unique(prefix)

    def __enter__(self) -> Netns:
        sh("ip", "netns", "add", self.name)
        self.ip("link", "set", "lo", "up")
        # Observer sockets made in here queue 10 datagrams by default; a full
        # one makes QEMU's dgram netdev spin (EAGAIN, yet "writable").
        sh(*self.exec_argv("sysctl", "-q", "-w", f"net.unix.max_dgram_qlen={OBSERVER_QUEUE}"))
        return self

    def __exit__(self, *exc: object) -> None:
        sh("ip", "netns", "del", self.name, check=False)

    def ip(self, *args: str, check: bool = True) -> str:
        return sh("ip", "-n", self.name, *args, check=check)

    def exec_argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the block in this namespace (sockets made here stay in it)."""
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            try:
                yield
            finally:
                if libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back failed")
        finally:
            os.close(home)
            os.close(target)

    def add_veth(self, lower: str, wire: str) -> None:
        """A veth pair, both ends up: ``lower`` for a VM, ``wire`` for the test."""
        self.ip("link", "add", lower, "type", "veth", "peer", "name", wire)
        self.ip("link", "set", wire, "up")
        self.ip("link", "set", lower, "up")

    def link_exists(self, name: str) -> bool:
        return bool(self.ip("link", "show", name, check=False))

    def links(self, kind: str) -> list[str]:
        out = self.ip("-o", "link", "show", "type", kind)
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()]

    def packet_socket(self, ifname: str) -> socket.socket:
        """A raw socket on ``ifname`` that sees only test frames."""
        with self.entered():
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_TEST))
            sock.bind((ifname, ETH_P_TEST))
        return sock


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def test_frame(dst: str, src: str, payload: bytes) -> bytes:
    return mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ETH_P_TEST) + payload.ljust(46, b"\0")


def frame_payload(frame: bytes) -> bytes | None:
    if len(frame) < 14 or struct.unpack("!H", frame[12:14])[0] != ETH_P_TEST:
        return None
    return frame[14:]


class Observer:
    """The test's end of a ``-netdev dgram`` port on a NIC's hub."""

    def __init__(self, directory: str, name: str) -> None:
        self.ours = os.path.join(directory, f"{name}.obs")
        self.theirs = os.path.join(directory, f"{name}.qemu")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ours)
        self.sock.bind(self.ours)

    def qemu_args(self, netdev_id: str, hub: int) -> list[str]:
        return ["-netdev", f"dgram,id={netdev_id},local.type=unix,local.path={self.theirs},"
                f"remote.type=unix,remote.path={self.ours}",
                "-netdev", f"hubport,id={netdev_id}p,hubid={hub},netdev={netdev_id}"]

    def recv(self, timeout: float) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return None

    def drain(self) -> None:
        while self.recv(0.0) is not None:
            pass

    def inject(self, frame: bytes) -> None:
        self.sock.sendto(frame, self.theirs)

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ours)


class Qemu:
    """A running (not paused) QEMU with no guest OS: SeaBIOS idles, the hub forwards."""

    def __init__(self, vm: VmConfig, directory: str, observe: bool = True, monitor: bool = False,
                 extra_args: list[str] | None = None, pass_fds: tuple[int, ...] = (), netns: str | None = None) -> None:
        self.vm = vm
        # Where QEMU runs: a NIC whose tap QEMU opens by name (redirect wiring) finds it only in its namespace.
        self.netns = netns
        self.directory = directory
        self.extra_args = extra_args or []
        self.pass_fds = pass_fds  # for netdevs given as "fd=N" in extra_args
        # A second QMP monitor for the test's own questions: netwatch's is taken.
        self.monitor = os.path.join(directory, f"{vm.name}.test.qmp") if monitor else None
        self.observers: dict[str, Observer] = {}
        if observe:
            for nic in vm.nics:
                if nic.wiring == "hub":  # a direct NIC has no hub to listen on
                    self.observers[nic.id] = Observer(directory, f"{vm.name}-{nic.id}")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = os.path.join(directory, f"{vm.name}.qemu.log")

    def argv(self) -> list[str]:
        argv = [QEMU_BINARY, "-machine", self.vm.machine, "-accel", "tcg", "-nodefaults", "-no-user-config",
                "-display", "none", "-m", "64", "-name", self.vm.name,
                # No option ROM: otherwise SeaBIOS runs iPXE on the NIC for
                # ~20 s (DHCP noise, fds that come and go).
                "-global", "virtio-net-pci.romfile=", *vm_args(self.vm)]
        if self.monitor:
            argv += ["-qmp", f"unix:{self.monitor},server=on,wait=off"]
        if self.vm.uuid is not None and "-uuid" not in self.extra_args:
            argv += ["-uuid", self.vm.uuid]  # as libvirt gives every domain's QEMU
        argv += self.extra_args
        for nic in self.vm.nics:
            if nic.id in self.observers:
                argv += self.observers[nic.id].qemu_args(f"obs{self.vm.nics.index(nic)}", nic.hub)
        return argv

    def start(self) -> Qemu:
        for path in (self.vm.qmp, self.monitor):
            with contextlib.suppress(FileNotFoundError, TypeError):
                os.unlink(path)  # type: ignore[arg-type]
        for observer in self.observers.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(observer.theirs)
        with open(self.log, "ab") as log:
            argv = self.argv() if self.netns is None else ["ip", "netns", "exec", self.netns, *self.argv()]
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         pass_fds=self.pass_fds, preexec_fn=_die_with_parent)
        sockets = [path for path in (self.vm.qmp, self.monitor) if path]
        wait_until(lambda: all(os.path.exists(path) for path in sockets)
                   or self.proc is None or self.proc.poll() is not None,
                   20, f"QEMU of {self.vm.name} to open its QMP socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"QEMU exited: {Path(self.log).read_text()[-2000:]}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)
        self.proc = None

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run one command on the test monitor."""
        from qemu.qmp.legacy import QEMUMonitorProtocol
        assert self.monitor, "started without a test monitor"
        client = QEMUMonitorProtocol(self.monitor)
        client.settimeout(5)
        try:
            client.connect()
            return client.cmd(command, **arguments)
        finally:
            client.close()

    def info_network(self) -> str:
        return str(self.qmp("human-monitor-command", **{"command-line": "info network"}))

    def close(self) -> None:
        self.kill(signal.SIGTERM)
        for observer in self.observers.values():
            observer.close()


class Netwatch:
    """``netwatch run`` as a child process, in ``netns`` (None: where we are)."""

    def __init__(self, netns: Netns | None, config_path: str, log_path: str,
                 env: dict[str, str] | None = None) -> None:
        self.netns = netns
        self.config_path = config_path
        self.log_path = log_path
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Netwatch:
        argv = [sys.executable, "-m", "netwatch", "run", "-c", self.config_path]
        # Plain stderr lines unless a test asks for a journal.
        env = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
        env.setdefault("NETWATCH_JOURNAL_SOCKET", "/nonexistent")
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.netns.exec_argv(*argv) if self.netns else argv,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                         preexec_fn=_die_with_parent)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        code = self.proc.wait(15)
        self.proc = None
        return code

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text()
        except OSError:
            return ""


def write_config(path: str, state_dir: str, vms: list[dict[str, Any]], **settings: Any) -> None:
    """A netwatch config file for ``vms`` (dicts shaped like [[vm]] tables)."""
    settings = {"state_dir": state_dir, "hooks_dir": state_dir + "/hooks", "udev": "kernel", **settings}
    lines = ["[netwatch]", *(f"{key} = {_toml(value)}" for key, value in settings.items()), ""]
    for vm in vms:
        lines += ["[[vm]]", f"name = {_toml(vm['name'])}"]
        if vm.get("qmp"):  # none: a VM netwatch has no monitor for
            lines.append(f"qmp = {_toml(vm['qmp'])}")
        lines += [f"{key} = {_toml(value)}" for key, value in vm.items() if key not in ("name", "qmp", "nics")]
        for nic in vm.get("nics", []):
            lines.append("  [[vm.nic]]")
            for key, value in nic.items():
                lines.append(f"  {key} = {_toml(value)}")
        lines.append("")
    Path(path).write_text("\n".join(lines))


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))  # a JSON string is a TOML basic string


async def veth_up(lower: str, wire: str, wire_mac: str | None = None) -> float:
    """Create a veth pair here; return the moment ``lower`` exists, already up.

    ``lower`` is created up in one request, so a watcher cannot start early
    on a "created but down" event; the wire end comes up right after (with
    ``wire_mac`` if given: a peer whose MAC stays put across recreations).
    """
    from pyroute2 import AsyncIPRoute
    peer: str | dict[str, str] = {"ifname": wire, "address": wire_mac} if wire_mac else wire
    async with AsyncIPRoute() as ipr:
        await ipr.link("add", ifname=lower, kind="veth", peer=peer, state="up")
        up_at = time.monotonic()
        wire_index = (await ipr.link_lookup(ifname=wire))[0]
        await ipr.link("set", index=wire_index, state="up")
        return up_at


async def delete_link(name: str) -> None:
    from pyroute2 import AsyncIPRoute
    async with AsyncIPRoute() as ipr:
        found = await ipr.link_lookup(ifname=name)
        if found:
            await ipr.link("del", index=found[0])


def wire_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_TEST))
    sock.bind((ifname, ETH_P_TEST))
    return sock


def time_to_first_frame(wire: str, observer: Observer, dst_mac: str, since: float,
                        timeout: float = 10.0) -> float:
    """Send test frames on ``wire`` until one reaches ``observer``; seconds since ``since``."""
    # Unbound and listening to nothing: binding a packet socket waits for an
    # RCU grace period (~8 ms here), which would be counted against netwatch.
    sock = sender_socket()
    tag = uuid.uuid4().bytes
    frame = test_frame(dst_mac, "02:00:00:00:00:01", tag)
    while time.monotonic() - since < timeout:
        with contextlib.suppress(OSError):  # the wire may not exist yet
            sock.sendto(frame, (wire, 0))
        got = observer.recv(0.0005)
        while got is not None:
            payload = frame_payload(got)
            if payload is not None and payload.startswith(tag):
                return time.monotonic() - since
            got = observer.recv(0.0)
    raise Deadline(f"no frame from {wire} reached the guest's hub within {timeout:g} s")


_SENDERS: dict[int, socket.socket] = {}


def sender_socket() -> socket.socket:
    """One send-only packet socket per network namespace this process is in."""
    key = os.stat("/proc/self/ns/net").st_ino
    if key not in _SENDERS:
        _SENDERS[key] = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    return _SENDERS[key]
