"""Live migration of a libvirt-native netwatch NIC between two libvirt hosts, beside libvirt's own direct NIC.

Two hosts (tests/libvirt_pair.py: a libvirtd each, joined by a migration link, their lowers on one
switch), each with its own netwatch and netwatch's libvirt hook. Domain "nwr" has one redirect NIC, built
from ``netwatch qemu-args --libvirt`` alone (no monitor of netwatch's); domain "nwd" has libvirt's own
``type='direct'`` macvtap. Both boot the test guest, which pings the switch's peer every 0.2 s, and both are
migrated ``virsh migrate --live`` A -> B -> A, in a random order each round, in one run; the guests' lost
pings are counted, and the longest time without a TCP echo answer from the switch is printed beside them.

On each host netwatch follows the domain from libvirt's hook alone: the target's NIC is joined at
``migrate``/``prepare`` (before QEMU opens the tap) and its if-up says migrate-in; the source's macvlan
goes when libvirt stops its QEMU, with if-down migrate-out.

Long form, by hand: NETWATCH_MIGRATION_ROUNDS=5 pytest tests/test_libvirt_migration.py -s
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netwatch.sandbox.guest import GuestError
from netwatch.sandbox.testbed import Netwatch, wait_until, write_config
from netwatch.service import control

from .libvirt_host import running
from .libvirt_pair import LOWER, EchoProbe, LibvirtPair, direct_nic, longest_silence
from .test_libvirt_native import interfaces
from .world import run_netwatch

pytestmark = pytest.mark.integration

NW, DIRECT = "nwr", "nwd"
NIC, MAC, DIRECT_MAC = "ua-nw0", "52:54:00:79:10:01", "52:54:00:79:10:02"
ADDRESS = {NW: "10.79.1.2", DIRECT: "10.79.1.3"}
ROUNDS = int(os.environ.get("NETWATCH_MIGRATION_ROUNDS", "1"))
RECORD = ('python3 -c \'import json,sys; e=open("/proc/%s/environ" % sys.argv[3]).read().split("\\0"); '
          'print(json.dumps({{"argv": sys.argv[1:3], "env": dict(x.split("=",1) for x in e if x)}}))\' '
          '"$1" "$2" $$ >> {log}\n')


class Host:
    """One host's netwatch: its config (the same VM on both hosts), state, hooks and log."""

    def __init__(self, root: Path, label: str, domain_uuid: str) -> None:
        self.label = label
        self.dir = root / f"nw{label}"
        self.dir.mkdir()
        self.config = self.dir / "netwatch.toml"
        self.state = str(self.dir / "state")
        self.hook_log = self.dir / "hooks.jsonl"
        write_config(str(self.config), self.state, [{
            "name": NW, "libvirt_domain": NW, "uuid": domain_uuid,
            "nics": [{"id": NIC, "backend": "macvtap", "wiring": "redirect", "lower": LOWER, "mac": MAC}]}])
        for direction in ("up", "down"):
            hook = Path(self.state) / "hooks" / f"if-{direction}.d" / "50-record"
            hook.parent.mkdir(parents=True)
            hook.write_text("#!/bin/sh\n" + RECORD.format(log=self.hook_log))
            hook.chmod(0o755)
        self.netwatch: Netwatch | None = None

    def libvirt_hook(self) -> str:
        """conf/libvirt/qemu.d/netwatch, pointed at this host's netwatch config."""
        shipped = (Path(__file__).parent.parent / "conf" / "libvirt" / "qemu.d" / "netwatch").read_text()
        netwatch = Path(sys.executable).with_name("netwatch")
        return shipped.replace("/usr/local/bin/netwatch libvirt-hook", f"{netwatch} libvirt-hook -c {self.config}")

    def nic(self) -> dict[str, Any]:
        status = control.request(self.state, "status", timeout=5)
        return dict(status["vms"][0]["nics"][0])

    def contexts(self) -> list[str]:
        if not self.hook_log.exists():
            return []
        return [json.loads(line)["argv"][1] for line in self.hook_log.read_text().splitlines() if line.strip()]


def dump_all(pair: LibvirtPair, hosts: dict[str, Host]) -> str:
    """Both libvirts' view of the netwatch domain, and both netwatches' logs (tails)."""
    return "\n".join([pair.dump(NW), *(f"== netwatch {h.label}\n{h.netwatch.log()[-4000:]}"
                                       for h in hosts.values() if h.netwatch)])


@pytest.fixture
def setup(short_tmp: Path) -> Iterator[tuple[LibvirtPair, dict[str, Host], str]]:
    domain_uuid = str(uuid_mod.uuid4())
    hosts = {label: Host(short_tmp, label, domain_uuid) for label in ("A", "B")}
    pair = LibvirtPair(short_tmp / "p", hook_scripts={label: {"netwatch": host.libvirt_hook()}
                                                      for label, host in hosts.items()})
    (short_tmp / "p").mkdir()
    os.chmod(short_tmp, 0o711)
    with running(pair, "test_libvirt_migration"):
        try:
            for label, host in hosts.items():
                host.netwatch = Netwatch(pair[label].ns, str(host.config), str(host.dir / "netwatch.log")).start()
            yield pair, hosts, domain_uuid
        finally:
            for host in hosts.values():
                if host.netwatch is not None:
                    host.netwatch.kill()


def test_live_migration_between_two_libvirt_hosts_loses_no_more_than_libvirts_direct_nic(
        setup: tuple[LibvirtPair, dict[str, Host], str]) -> None:
    pair, hosts, domain_uuid = setup
    a, b = hosts["A"], hosts["B"]
    printed = run_netwatch("qemu-args", "-c", str(a.config), "--libvirt", NW)
    assert printed.returncode == 0 and "qemu:commandline" not in printed.stdout, printed
    element = interfaces(printed.stdout)[NIC]
    try:
        pair.define("A", NW, pair.domain_xml(NW, f"{ADDRESS[NW]}/24", [element], uuid=domain_uuid, serve=True))
        pair.define("A", DIRECT, pair.domain_xml(DIRECT, f"{ADDRESS[DIRECT]}/24", [direct_nic(DIRECT_MAC)],
                                                 serve=True))
    except GuestError as exc:
        pytest.fail(f"the test guest cannot be built: {exc}", pytrace=False)

    def dump() -> str:
        return dump_all(pair, hosts)

    # netwatch ran first on both hosts: the tap libvirt opens by name is on each; joined only where it runs.
    wait_until(lambda: b.nic()["state"] == "waiting-vm" and b.nic()["ifindex"] is not None, 15,
               "B's tap, not joined", dump)
    for name in (NW, DIRECT):
        pair["A"].virsh("start", name)
    wait_until(lambda: a.nic()["state"] == "attached", 30, "A's NIC attached", dump)
    for name in (NW, DIRECT):
        pair.wait_pings(name, 3, timeout=120)
    probes = {name: EchoProbe(pair, ADDRESS[name]) for name in (NW, DIRECT)}
    lost: dict[str, int] = {NW: 0, DIRECT: 0}
    silences: dict[str, list[float]] = {NW: [], DIRECT: []}
    where = "A"
    try:
        for _round in range(ROUNDS):
            for src, dst in (("A", "B"), ("B", "A")):
                for name in random.sample([NW, DIRECT], 2):
                    serial = pair.serial(name)
                    serial.set_mark()
                    began = time.monotonic()
                    pair.migrate(name, src, dst)
                    done = time.monotonic()
                    # Until the guest has answered 5 pings on the target (1 s at its pace): the outage is over.
                    pair.wait_pings(name, 5, timeout=30)
                    end = time.monotonic()
                    failed = serial.count("GUEST-PING fail")
                    lost[name] += failed
                    silence = longest_silence(probes[name].answers(), began, end)
                    silences[name].append(silence)
                    print(f"\n{name} {src} -> {dst}: virsh migrate {done - began:.2f} s, pings lost {failed}, "
                          f"longest time without a TCP echo answer {silence * 1000:.0f} ms")
                    if name == NW:
                        here, there = hosts[dst], hosts[src]
                        wait_until(lambda h=here: h.nic()["state"] == "attached", 15, f"{dst}'s NIC attached", dump)
                        wait_until(lambda h=there: h.nic()["state"] == "waiting-vm", 15, f"{src}'s NIC let go",
                                   dump)
                        assert pair.running_on(NW) == [dst]
                        where = dst
    finally:
        for probe in probes.values():
            probe.stop()
    print(f"\n{2 * ROUNDS} migrations each: pings lost: netwatch redirect {lost[NW]}, libvirt direct {lost[DIRECT]}; "
          f"longest silence p50 netwatch {sorted(silences[NW])[len(silences[NW]) // 2] * 1000:.0f} ms, "
          f"direct {sorted(silences[DIRECT])[len(silences[DIRECT]) // 2] * 1000:.0f} ms")
    assert where == "A"
    # netwatch followed libvirt's hook on each host: up as migrate-in where the guest arrived, down as
    # migrate-out where it left.
    assert a.contexts() == ["start", *["migrate-out", "migrate-in"] * ROUNDS], (a.contexts(), dump())
    assert b.contexts() == ["migrate-in", "migrate-out"] * ROUNDS, (b.contexts(), dump())
    assert lost[NW] <= lost[DIRECT], f"netwatch's NIC lost {lost[NW]} pings, libvirt's direct NIC {lost[DIRECT]}"


def test_an_aborted_migration_leaves_the_guest_on_its_source_and_the_target_says_migrate_failed(
        setup: tuple[LibvirtPair, dict[str, Host], str]) -> None:
    pair, hosts, domain_uuid = setup
    a, b = hosts["A"], hosts["B"]
    printed = run_netwatch("qemu-args", "-c", str(a.config), "--libvirt", NW)
    assert printed.returncode == 0, printed
    try:
        pair.define("A", NW, pair.domain_xml(NW, f"{ADDRESS[NW]}/24", [interfaces(printed.stdout)[NIC]],
                                             uuid=domain_uuid))
    except GuestError as exc:
        pytest.fail(f"the test guest cannot be built: {exc}", pytrace=False)

    def dump() -> str:
        return dump_all(pair, hosts)

    pair["A"].virsh("start", NW)
    wait_until(lambda: a.nic()["state"] == "attached", 30, "A's NIC attached", dump)
    pair.wait_pings(NW, 3, timeout=120)
    # A migration slow enough to abort (1 MiB/s): the target's NIC is joined for the guest it expects...
    migration = pair.migrate_async(NW, "A", "B", "--bandwidth", "1")
    try:
        wait_until(lambda: b.nic()["state"] == "attached", 30, "B's NIC joined for the incoming guest", dump)
        wait_until(lambda: b.contexts() == ["migrate-in"], 10, "B's if-up migrate-in", dump)
        pair["A"].virsh("domjobabort", NW)
        _out, err = migration.communicate(timeout=60)
    finally:
        if migration.poll() is None:
            migration.kill()
            migration.wait(10)
    assert migration.returncode != 0 and ("abort" in err.lower() or "cancel" in err.lower()), err
    # ... and taken down as migrate-failed when libvirt ends the target's QEMU; the source never noticed.
    wait_until(lambda: b.nic()["state"] == "waiting-vm", 15, "B's NIC let go", dump)
    wait_until(lambda: b.contexts() == ["migrate-in", "migrate-failed"], 10, "B's if-down migrate-failed", dump)
    assert pair.running_on(NW) == ["A"]
    serial = pair.serial(NW)
    serial.set_mark()
    pair.wait_pings(NW, 3, timeout=30)
    assert a.nic()["state"] == "attached" and a.contexts() == ["start"], (a.contexts(), dump())
