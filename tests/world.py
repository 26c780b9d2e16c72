"""A test's world: one throwaway namespace, its QEMUs and a netwatch, all removed after."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from netwatch import config as config_mod
from netwatch.errors import NetwatchError, ServiceNotRunning
from netwatch.sandbox.testbed import (
    Deadline,
    Netns,
    Netwatch,
    Qemu,
    frame_payload,
    test_frame,
    time_to_first_frame,
    veth_up,
    wait_until,
    write_config,
)
from netwatch.service import control

PEER_MAC = "02:00:00:00:00:01"
# How long a netwatch just started may take to open its control socket.
STARTUP = 30.0


class NotAnswering(AssertionError):
    """netwatch gave no status: it exited, hangs, or answered with an error."""


class World:
    def __init__(self, tmp: Path, ns: Netns) -> None:
        self.tmp = tmp
        self.ns = ns
        self.state = str(tmp / "state")
        self.config_path = str(tmp / "netwatch.toml")
        self.qemus: dict[str, Qemu] = {}
        self.netwatch: Netwatch | None = None
        self.vms: list[dict[str, Any]] = []
        self.settings: dict[str, Any] = {}
        self.hooks_dir = Path(self.state) / "hooks"
        self._scratch: Netns | None = None

    # -- building ------------------------------------------------------------

    def vm(self, name: str, *nics: dict[str, Any]) -> dict[str, Any]:
        vm = {"name": name, "qmp": str(self.tmp / f"{name}.qmp"), "nics": list(nics)}
        self.vms.append(vm)
        self.write_config()
        return vm

    def vm_dict(self, name: str) -> dict[str, Any]:
        """The [[vm]] table of ``name``, to change before write_config()."""
        return next(vm for vm in self.vms if vm["name"] == name)

    def write_config(self) -> None:
        write_config(self.config_path, self.state, self.vms, **self.settings)

    def bridge(self, name: str) -> None:
        self.ns.ip("link", "add", name, "type", "bridge")
        self.ns.ip("link", "set", name, "up")

    def master_of(self, ifname: str) -> str | None:
        info = json.loads(self.ns.ip("-j", "link", "show", ifname))[0]
        return info.get("master")

    def hook(self, direction: str, name: str, body: str) -> Path:
        """An executable hook script (``#!/bin/sh``) in the world's hooks_dir."""
        path = self.hooks_dir / f"if-{direction}.d" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
        return path

    def recording_hooks(self) -> Path:
        """Hooks that append their argv and exact environment, one JSON object per run."""
        log = self.tmp / "hooks.jsonl"
        body = (f'python3 -c \'import json,sys; e=open("/proc/%s/environ" % sys.argv[3]).read().split("\\0"); '
                f'print(json.dumps({{"argv": sys.argv[1:3], "env": dict(x.split("=",1) for x in e if x)}}))\' '
                f'"$1" "$2" $$ >> {log}\n')
        self.hook("up", "50-record", body)
        self.hook("down", "50-record", body)
        return log

    def hook_runs(self) -> list[dict[str, Any]]:
        path = self.tmp / "hooks.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def config(self) -> config_mod.Config:
        return config_mod.load(self.config_path)

    def lower(self, lower: str, wire: str) -> None:
        with self.ns.entered():
            asyncio.run(veth_up(lower, wire))

    def delete_link(self, name: str) -> None:
        self.ns.ip("link", "del", name)

    def start_qemu(self, name: str, extra_args: list[str] | None = None) -> Qemu:
        vm = self.config().vm(name)
        assert vm is not None
        old = self.qemus.get(name)
        if old is not None:
            old.close()
        with self.ns.entered():  # its observer sockets get the namespace's longer queues
            # ip netns exec execs QEMU itself: its pid stays the one netwatch checks and the test ends.
            qemu = Qemu(vm, str(self.tmp), monitor=True, extra_args=extra_args,
                        netns=self.ns.name if any(nic.wiring == "redirect" for nic in vm.nics) else None)
        qemu.start()
        self.qemus[name] = qemu
        return qemu

    def start_netwatch(self, env: dict[str, str] | None = None) -> Netwatch:
        self.netwatch = Netwatch(self.ns, self.config_path, str(self.tmp / "netwatch.log"), env).start()
        return self.netwatch

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A netwatch command against this world's config, as an admin runs it."""
        return run_netwatch(args[0], "-c", self.config_path, *args[1:])

    def scratch_netns(self) -> str:
        """A second namespace to move links into (removed with the world)."""
        if self._scratch is None:
            self._scratch = Netns("nwx").__enter__()
        return self._scratch.name

    def close(self) -> None:
        if self.netwatch is not None:
            self.netwatch.kill(signal.SIGTERM)
        for qemu in self.qemus.values():
            qemu.close()
        if self._scratch is not None:
            self._scratch.__exit__(None, None, None)

    # -- looking -------------------------------------------------------------

    def status(self, startup: float = STARTUP) -> dict[str, Any]:
        """netwatch's answer to ``status``; NotAnswering if there is none.

        Only an answer counts: a netwatch that exited, hangs (no answer
        within 5 s) or answers with an error raises, so that "no such NIC"
        can never be read out of a dead service. A netwatch this world
        started that is still running but has not opened its control socket
        yet (starting) is waited for, up to ``startup`` seconds.
        """
        end = time.monotonic() + startup
        while True:
            try:
                return dict(control.request(self.state, "status", timeout=5))
            except ServiceNotRunning as exc:
                if not self._netwatch_running() or time.monotonic() >= end:
                    raise NotAnswering(f"status: {exc}; {self._netwatch_fate()}") from exc
            except NetwatchError as exc:  # it hangs, or answered with an error
                raise NotAnswering(f"status: {exc}; {self._netwatch_fate()}") from exc
            time.sleep(0.05)

    def nic(self, vm: str, nic: str) -> dict[str, Any]:
        """The NIC's status; {} only when a netwatch that answered shows no such NIC."""
        for vm_status in self.status()["vms"]:
            if vm_status["name"] == vm:
                for nic_status in vm_status["nics"]:
                    if nic_status["id"] == nic:
                        return dict(nic_status)
        return {}

    def _netwatch_running(self) -> bool:
        return self.netwatch is not None and self.netwatch.proc is not None and self.netwatch.proc.poll() is None

    def _netwatch_fate(self) -> str:
        if self.netwatch is None or self.netwatch.proc is None:
            return "no netwatch is running in this world"
        code = self.netwatch.proc.poll()
        state = f"running (pid {self.netwatch.pid})" if code is None else f"exited with {code}"
        return f"netwatch {state}; its log ends:\n{self.netwatch.log()[-2000:]}"

    def dump(self) -> str:
        try:
            status = json.dumps(self.status(startup=0), indent=1)
        except NotAnswering as exc:  # a dump shows what is, whatever it is (the log follows)
            status = str(exc).split("; its log ends", 1)[0]
        parts = ["== status", status, "== ip -d link", self.ns.ip("-d", "link", check=False)]
        if self.netwatch is not None:
            parts += ["== netwatch log (tail)", self.netwatch.log()[-4000:]]
        for name, qemu in self.qemus.items():
            if qemu.proc is not None:
                try:
                    parts += [f"== info network of {name}", qemu.info_network()]
                except Exception as exc:  # noqa: BLE001 - a dump must not fail
                    parts += [f"== info network of {name}: {exc}"]
        return "\n".join(parts)

    def wait_state(self, vm: str, nic: str, state: str, timeout: float = 20, **match: Any) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            status = self.nic(vm, nic)
            if status.get("state") == state and all(status.get(k) == v for k, v in match.items()):
                return status
            return None
        return wait_until(ready, timeout, f"{vm}/{nic} to be {state} {match or ''}", self.dump)

    def macvtaps(self) -> list[str]:
        return self.ns.links("macvtap")

    def backend_netdevs(self, vm: str) -> list[str]:
        return sorted(set(re.findall(r"nw-[A-Za-z0-9._-]+-(?:tap|up)\d+", self.qemus[vm].info_network())))

    # -- frames --------------------------------------------------------------

    def frame_reaches_guest(self, vm: str, nic: str, wire: str, timeout: float = 10) -> float:
        """Send on ``wire`` until a frame reaches the NIC's hub; seconds taken."""
        observer = self.qemus[vm].observers[nic]
        mac = self._mac(vm, nic)
        observer.drain()
        with self.ns.entered():
            try:
                return time_to_first_frame(wire, observer, mac, time.monotonic(), timeout)
            except Deadline as exc:
                raise Deadline(f"{exc}\n{self.dump()}") from None

    def frame_reaches_wire(self, vm: str, nic: str, wire: str, timeout: float = 10) -> None:
        """Have the guest send a frame; it must come out on ``wire``."""
        observer = self.qemus[vm].observers[nic]
        tag = uuid.uuid4().bytes
        sock = self.ns.packet_socket(wire)
        sock.settimeout(0.05)
        try:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                observer.inject(test_frame(PEER_MAC, self._mac(vm, nic), tag))
                try:
                    while True:
                        payload = frame_payload(sock.recv(4096))
                        if payload is not None and payload.startswith(tag):
                            return
                except TimeoutError:
                    continue
            raise Deadline(f"no guest frame came out on {wire} within {timeout} s\n{self.dump()}")
        finally:
            sock.close()

    def _mac(self, vm: str, nic: str) -> str:
        # From the world's own description: the file on disk may be broken on purpose.
        vm_dict = next(v for v in self.vms if v["name"] == vm)
        return str(next(n["mac"] for n in vm_dict["nics"] if n["id"] == nic))


def run_netwatch(*args: str, ns: Netns | None = None, env: dict[str, str] | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "netwatch", *args]
    if ns is not None:
        argv = ns.exec_argv(*argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
