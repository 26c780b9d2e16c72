"""netwatch under a real systemd (PID 1), installed exactly as the README says.

A Debian 12 tree boots under systemd-nspawn (tests/systemd_host.py: built
once with debootstrap, about a minute, then cached; it boots in about a
second). The README's "Running it as a service" commands are read from
README.md and run inside, from a copy of this source tree; the container has
no network, so pip is pointed at a wheelhouse fetched on the host
(PIP_NO_INDEX, PIP_FIND_LINKS: the same commands). All links (a veth lower,
the macvtap) and a QEMU (TCG, no guest OS, with an observer port on the NIC's
hub) live inside the container's own network namespace. Checked, in order:
the unit starts and reaches READY; the macvtap NIC attaches and passes frames
both ways; lower flaps each reattach (lower-up to frames-through time is
printed); ``systemctl reload``; ``systemctl restart`` adopts the backend; the
watchdog kills a SIGSTOPped netwatch and the restarted one adopts the
backend; journal catalog text and fields; ``control_group``;
``systemd-analyze security`` (exposure printed, at most MAX_EXPOSURE, the
bound tests/test_systemd.py checks offline). Then a redirect-wired NIC beside
the macvtap one, with the unit's redirect drop-in installed: its persistent
tap exists before its QEMU (started by the container's systemd) opens it,
frames pass from the wire to the tap, a lower flap joins it again (the guest's
MAC announced from the host, on the wire), the kernel check answered under
the sandbox, and netwatch logged no error; the exposure with the drop-in is
printed (at most MAX_EXPOSURE_REDIRECT).

    .venv/bin/pytest -s tests/test_real_systemd.py

takes about 45 s with the tree cached (30 s of it the watchdog step: WatchdogSec=30s),
about a minute more for the first build.

Knobs: NETWATCH_SYSTEMD_FLAPS=N (default 3) for more flaps;
NETWATCH_SYSTEMD_SRC=DIR to install another source tree (for example an
older commit: ``git archive HEAD | tar -x -C DIR``); NETWATCH_SYSTEMD_HOST_CACHE
for the tree's cache directory. Needs root, ``systemd-container``,
``debootstrap`` and, for the first build, the Debian mirror apt uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netwatch.events import EVENT_KINDS
from netwatch.qemu.qmp import parse_info_network
from netwatch.sandbox.testbed import wait_until

from .systemd_host import CGROUP_HIERARCHIES, HostError, SystemdHost, build_tree, missing_tools, wheelhouse
from .test_systemd import MAX_EXPOSURE, MAX_EXPOSURE_REDIRECT, REDIRECT_DROP_IN

REPO = Path(__file__).resolve().parent.parent
SOURCE = Path(os.environ.get("NETWATCH_SYSTEMD_SRC", REPO)).resolve()
FLAPS = int(os.environ.get("NETWATCH_SYSTEMD_FLAPS", "3"))
SRC_INSIDE = "/root/netwatch-src"
GUEST_MAC = "52:54:00:5e:00:01"
LOWER, WIRE = "lower0", "wire0"
QMP_DIR, OBS_DIR = "/run/nw-qmp", "/run/nw-obs"
TEST_MONITOR = f"{QMP_DIR}/vm1.test.qmp"
VENV_PYTHON = "/opt/netwatch/bin/python"
PROBE_PATH = "/root/nwprobe.py"
WATCHDOG_DEADLINE = 90  # WatchdogSec=30s, then the abort, then RestartSec=1s

METRICS = "/var/lib/prometheus/node-exporter/netwatch.prom"
CONFIG = f"""[netwatch]
control_group = "netwatch"
metrics_file = "{METRICS}"

[[vm]]
name = "vm1"
qmp = "{QMP_DIR}/vm1.qmp"

  [[vm.nic]]
  id = "net0"
  backend = "macvtap"
  lower = "{LOWER}"
  mode = "bridge"
  mac = "{GUEST_MAC}"
"""
# Added for the reload step: a VM whose NIC must show up without a restart.
CONFIG_VM2 = f"""
[[vm]]
name = "vm2"
qmp = "{QMP_DIR}/vm2.qmp"

  [[vm.nic]]
  id = "net0"
  backend = "macvtap"
  lower = "{LOWER}"
  mac = "52:54:00:5e:00:02"
"""

# Added for the redirect steps: a VM whose NIC's tap netwatch makes and keeps.
REDIRECT_MAC = "52:54:00:5e:00:03"
REDIRECT_TAP = "nw-vm3-net0"
CONFIG_VM3 = f"""
[[vm]]
name = "vm3"
qmp = "{QMP_DIR}/vm3.qmp"

  [[vm.nic]]
  id = "net0"
  backend = "macvtap"
  wiring = "redirect"
  lower = "{LOWER}"
  mac = "{REDIRECT_MAC}"
"""
REDIRECT_PROBE_PATH = "/root/nwprobe_redirect.py"
# Inside, with the venv python: sends test frames on the wire to the redirect
# NIC's MAC until one leaves its tap towards QEMU ("in_ms"). "up" first makes
# the veth lower and times from then, and also waits for the guest MAC's RARP
# announcement on the wire ("rarp_ms"; netwatch sends it on the macvlan after
# each reattach, through a packet socket the unit must allow).
REDIRECT_PROBE = f"""
import asyncio, json, select, socket, sys, time, uuid
from netwatch.sandbox.testbed import frame_payload, sender_socket, test_frame, veth_up

MAC, TAP, LOWER, WIRE = {REDIRECT_MAC!r}, {REDIRECT_TAP!r}, {LOWER!r}, {WIRE!r}
ETH_P_ALL, ETH_P_RARP = 0x0003, 0x8035
guest = bytes.fromhex(MAC.replace(":", ""))
# Open before the wire exists (an unbound packet socket sees every link): the first round comes at once.
rarp = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_RARP))
tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
tap.bind((TAP, 0))
up = sys.argv[1] == "up"
since = asyncio.run(veth_up(LOWER, WIRE)) if up else time.monotonic()
sender = sender_socket()
tag = uuid.uuid4().bytes
frame = test_frame(MAC, "02:00:00:00:00:01", tag)
figures = {{}}
deadline = since + 10
while "in_ms" not in figures or (up and "rarp_ms" not in figures):
    if time.monotonic() > deadline:
        raise SystemExit(f"after 10 s: {{figures}} (no frame from {{WIRE}} left {{TAP}}, or no RARP from {{MAC}})")
    if "in_ms" not in figures:
        try:
            sender.sendto(frame, (WIRE, 0))
        except OSError:
            pass
    ready, _, _ = select.select([tap, rarp], [], [], 0.002)
    now = time.monotonic()
    if tap in ready:
        payload = frame_payload(tap.recv(65536))
        if payload is not None and payload.startswith(tag):
            figures.setdefault("in_ms", (now - since) * 1000)
    if rarp in ready:
        got, where = rarp.recvfrom(65536)
        if where[0] == WIRE and got[6:12] == guest and got[12:14] == b"\\x80\\x35":
            figures.setdefault("rarp_ms", (now - since) * 1000)
print("PROBE " + json.dumps(figures))
"""

# Runs inside with netwatch's venv python (for pyroute2 and the sandbox's
# frame helpers). Binds the observer socket QEMU's dgram port sends to:
# "in" is a frame sent on the wire reaching the guest NIC's hub, "out" a
# frame injected as the guest NIC's reaching the wire. "up" first creates
# the veth lower (already up) and times from that moment.
PROBE = f"""
import asyncio, json, sys, time, uuid
from netwatch.sandbox.testbed import Observer, frame_payload, test_frame, time_to_first_frame, veth_up, wire_socket

MAC, LOWER, WIRE = {GUEST_MAC!r}, {LOWER!r}, {WIRE!r}


def outward(observer, timeout=10.0):
    sock = wire_socket(WIRE)
    sock.settimeout(0.002)
    tag = uuid.uuid4().bytes
    frame = test_frame("ff:ff:ff:ff:ff:ff", MAC, tag)
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        observer.inject(frame)
        until = time.monotonic() + 0.01
        while time.monotonic() < until:
            try:
                got = sock.recv(65536)
            except TimeoutError:
                continue
            payload = frame_payload(got)
            if payload is not None and payload.startswith(tag):
                return time.monotonic() - start
    raise SystemExit(f"no frame from the guest NIC's hub reached {{WIRE}} within {{timeout:g}} s")


def info_network():
    from qemu.qmp.legacy import QEMUMonitorProtocol
    client = QEMUMonitorProtocol({TEST_MONITOR!r})
    client.settimeout(5)
    try:
        client.connect()
        print(client.cmd("human-monitor-command", **{{"command-line": "info network"}}))
    finally:
        client.close()


if sys.argv[1] == "network":
    info_network()
    sys.exit(0)
observer = Observer({OBS_DIR!r}, "vm1-net0")
try:
    since = asyncio.run(veth_up(LOWER, WIRE)) if sys.argv[1] == "up" else time.monotonic()
    inward = time_to_first_frame(WIRE, observer, MAC, since)
    out = outward(observer)
    print("PROBE " + json.dumps({{"in_ms": inward * 1000, "out_ms": out * 1000}}))
finally:
    observer.close()
"""


def readme_service_commands(page: str) -> list[str]:
    """The shell lines of the first code block under docs/service.md's "## Install" (the README points there)."""
    match = re.search(r"^## Install\n(.*?)(?=^## |\Z)", page, re.M | re.S)
    assert match, "docs/service.md has no section '## Install'"
    lines: list[str] = []
    fenced = False
    for line in match.group(1).splitlines():
        if line.startswith("```"):
            if fenced:
                break
            fenced = True
        elif fenced or line.startswith("    "):
            lines.append(line[0 if fenced else 4:])
        elif lines and line.strip():
            break
    commands = [line for line in lines if line.strip()]
    assert commands, "docs/service.md: no commands under '## Install'"
    return commands


def stage_source(dest: Path) -> Path:
    """A copy of the source tree without the venv, VCS and caches, to bind into the container."""
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".mypy_cache",
                                    ".ruff_cache", ".pytest_cache")
    shutil.copytree(SOURCE, dest, ignore=ignore, symlinks=True)
    return dest


class Run:
    """The steps' shared view of the container: questions asked with netwatch's own CLI."""

    def __init__(self, host: SystemdHost) -> None:
        self.host = host

    def dump(self) -> str:
        parts = []
        for command in ("systemctl status netwatch --no-pager -l", "journalctl -u netwatch -n 50 --no-pager",
                        "netwatch status --json", "ip -d link", "systemctl status nwt-qemu --no-pager -l -n 20"):
            done = self.host.run(command, check=False, timeout=30)
            parts.append(f"--- {command} (exit {done.returncode}) ---\n{done.stdout}{done.stderr}".rstrip())
        return "\n".join(parts)

    def nic(self, vm: str = "vm1", nic: str = "net0") -> dict[str, Any] | None:
        done = self.host.run("netwatch status --json", check=False, timeout=20)
        if done.returncode != 0:
            return None
        for entry in json.loads(done.stdout)["vms"]:
            for found in entry["nics"] if entry["name"] == vm else ():
                if found["id"] == nic:
                    return dict(found)
        return None

    def wait_nic(self, state: str, timeout: float = 30, vm: str = "vm1") -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            found = self.nic(vm)
            return found if found is not None and found["state"] == state else None
        found = wait_until(reached, timeout, f"{vm}/net0 to be {state}", interval=0.1)
        assert found is not None
        return found

    def prop(self, name: str, unit: str = "netwatch.service") -> str:
        return self.host.unit_property(unit, name)

    def wait_active(self, timeout: float = 30, not_pid: str | None = None) -> str:
        """Wait for the unit to be active (READY received); its MainPID, other than ``not_pid``."""
        def active() -> str | None:
            pid = self.prop("MainPID")
            ok = self.prop("ActiveState") == "active" and self.prop("SubState") == "running"
            return pid if ok and pid not in ("0", "", not_pid) else None
        pid = wait_until(active, timeout, "netwatch.service to be active", interval=0.2)
        assert pid is not None
        return pid

    def probe(self, mode: str = "probe") -> dict[str, float]:
        done = self.host.run(f"{VENV_PYTHON} {PROBE_PATH} {mode}", check=False, timeout=40)
        line = next((line for line in done.stdout.splitlines() if line.startswith("PROBE ")), None)
        assert done.returncode == 0 and line, f"frames did not pass: {done.stdout}{done.stderr}"
        return dict(json.loads(line.split(" ", 1)[1]))

    def qemu_backends(self) -> list[str]:
        """The tap netdevs on vm1's hubs, as QEMU itself lists them."""
        info = parse_info_network(self.host.out(f"{VENV_PYTHON} {PROBE_PATH} network", timeout=20))
        return [port.peer for port in info.ports if port.peer_type == "tap"]

    def journal(self, *matches: str) -> list[dict[str, Any]]:
        out = self.host.out(f"journalctl -u netwatch -o json --no-pager {' '.join(matches)}", timeout=30)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def adopted(self, before: dict[str, Any], what: str) -> dict[str, Any]:
        """vm1/net0 attached again with the very backend it had (no swap), passing frames."""
        after = self.wait_nic("attached")
        same = {key: (before[key], after[key]) for key in ("ifname", "ifindex", "netdev", "hub_netdev", "swaps")}
        assert all(old == new for old, new in same.values()), f"{what} did not adopt the backend: {same}"
        assert self.qemu_backends() == [before["netdev"]], f"QEMU's backends after {what}: {self.qemu_backends()}"
        self.probe()
        return after


@contextlib.contextmanager
def step(number: int | str, title: str, run: Run) -> Iterator[None]:
    print(f"[real systemd] step {number}: {title}", flush=True)
    started = time.monotonic()
    try:
        yield
    except Exception as exc:  # any failure becomes this step's, with the state dumped
        raise AssertionError(f"step {number} ({title}) failed: {exc}\n{run.dump()}") from exc
    print(f"[real systemd] step {number} passed ({time.monotonic() - started:.1f} s)", flush=True)


def _environment() -> tuple[Path, Path]:
    missing = missing_tools()
    if missing:
        reason = f"needs a real systemd: apt-get install {' '.join(missing)}"
        print(f"\n[real systemd] SKIPPED: {reason}")
        pytest.skip(reason)
    started = time.monotonic()
    try:
        tree, wheels = build_tree(), wheelhouse(SOURCE)
    except HostError as exc:
        print(f"\n[real systemd] FAILED to build the environment: {exc}")
        pytest.fail(str(exc))
    print(f"[real systemd] tree {tree} ready ({time.monotonic() - started:.1f} s)")
    return tree, wheels


@pytest.mark.integration
@pytest.mark.timeout(1800)  # the first run builds the Debian tree with debootstrap (minutes on a slow mirror)
def test_netwatch_under_real_systemd() -> None:
    tree, wheels = _environment()
    commands = readme_service_commands((SOURCE / "docs" / "service.md").read_text())
    starts = [i for i, line in enumerate(commands) if re.search(r"systemctl\b.*\b(enable --now|start)\b", line)]
    assert starts, f"README's service commands never start netwatch: {commands}"
    catalog = (SOURCE / "units" / "netwatch.catalog").read_text()
    staging = Path(tempfile.mkdtemp(prefix="nwt-src-"))
    begun = time.monotonic()
    try:
        src = stage_source(staging / "src")
        with SystemdHost(tree, [(src, "/mnt/netwatch-src"), (wheels, "/wheels")]) as host:
            print(f"[real systemd] booted {host.machine} in {time.monotonic() - begun:.1f} s")
            run = Run(host)
            ok, report = host.device_policy_enforced()
            assert ok, f"the container's systemd does not enforce DevicePolicy=, the test would prove nothing:\n" \
                       f"{report}"
            print("[real systemd] device policy enforced: DevicePolicy=closed keeps a unit from /dev/net/tun, "
                  "DeviceAllow= lets it in")
            _exercise(run, commands, starts[0], catalog)
        residue = [f"cgroup {h}/{host.machine}" for h in CGROUP_HIERARCHIES if os.path.exists(f"{h}/{host.machine}")]
        assert not host.leftovers and not residue, f"left behind: {host.leftovers + residue}"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"[real systemd] all steps passed in {time.monotonic() - begun:.1f} s (boot to poweroff)")


def _exercise(run: Run, commands: list[str], start_at: int, catalog: str) -> None:
    host = run.host
    # The world an admin has before installing: the lower, a group for the
    # CLI's users, a place for QEMU's sockets, and netwatch's source.
    host.run(f"ip link add {LOWER} type veth peer name {WIRE} && ip link set {WIRE} up && ip link set {LOWER} up "
             f"&& groupadd netwatch && useradd -M -G netwatch nwuser && mkdir -p {QMP_DIR} {OBS_DIR} "
             f"&& cp -a /mnt/netwatch-src {SRC_INSIDE} "
             # What the prometheus-node-exporter package leaves for its textfile collector.
             f"&& mkdir -p {os.path.dirname(METRICS)}"
             # The observer's socket queues 10 datagrams by default; a full one makes QEMU's dgram port spin.
             f"&& echo 4096 > /proc/sys/net/unix/max_dgram_qlen")
    # pip inside has no network: the same commands, pointed at the wheelhouse.
    pip_env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/wheels", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    def readme(lines: list[str]) -> None:
        script = "set -ex\n" + "\n".join(lines)
        host.run(f"cd {SRC_INSIDE} && {script}", env=pip_env, timeout=300)

    with step(0, "install as the README says, up to starting the unit", run):
        started = time.monotonic()
        readme(commands[:start_at])
        host.write("/etc/netwatch/netwatch.toml", CONFIG)  # "then edit it"
        host.write(PROBE_PATH, PROBE)
        print(f"  installed in {time.monotonic() - started:.1f} s: {' ; '.join(commands[:start_at])}")

    with step(1, "the unit starts and reaches READY (Type=notify)", run):
        readme(commands[start_at:])
        run.wait_active()
        print(f"  StatusText: {run.prop('StatusText')!r}, NRestarts {run.prop('NRestarts')}")
        assert run.prop("NRestarts") == "0"

    with step(2, "the macvtap NIC attaches and passes frames both ways", run):
        args = json.loads(host.out("netwatch qemu-args --json vm1"))
        hub = re.search(r"hubport,id=[^,]+,hubid=(\d+)", " ".join(args))
        assert hub, args
        qemu = ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-display", "none", "-nodefaults",
                "-no-user-config", "-m", "64", "-name", "vm1", "-global", "virtio-net-pci.romfile=", *args,
                "-qmp", f"unix:{TEST_MONITOR},server=on,wait=off",
                "-netdev", f"dgram,id=obs0,local.type=unix,local.path={OBS_DIR}/vm1-net0.qemu,"
                f"remote.type=unix,remote.path={OBS_DIR}/vm1-net0.obs",
                "-netdev", f"hubport,id=obs0p,hubid={hub.group(1)},netdev=obs0"]
        # A transient unit: the container's systemd owns QEMU and stops it at poweroff.
        host.run(f"systemd-run --quiet --collect --unit=nwt-qemu {shlex.join(qemu)}")
        attached = run.wait_nic("attached")
        frames = run.probe()
        print(f"  {attached['ifname']} (ifindex {attached['ifindex']}) -> netdev {attached['netdev']}; frames in "
              f"{frames['in_ms']:.1f} ms, out {frames['out_ms']:.1f} ms")

    with step("2b", "metrics_file is written under the unit's sandbox (ProtectSystem=strict, UMask=0077)", run):
        from prometheus_client.parser import text_string_to_metric_families

        def metrics() -> dict[str, float]:
            text = host.out(f"cat {METRICS} 2>/dev/null || true")
            return {f"{sample.name}{sorted(sample.labels.items())}": sample.value
                    for family in text_string_to_metric_families(text) for sample in family.samples}
        attached = "netwatch_nic_state[('nic', 'net0'), ('state', 'attached'), ('vm', 'vm1')]"
        wait_until(lambda: metrics().get(attached) == 1, 20, "the metrics file to show the NIC attached",
                   lambda: host.out(f"ls -l {os.path.dirname(METRICS)}; journalctl -u netwatch --no-pager | tail"))
        mode = host.out(f"stat -c %a {METRICS}").strip()
        assert mode == "644", f"{METRICS} has mode {mode}: node_exporter's user cannot read it"
        print(f"  {METRICS}: mode {mode}, {len(metrics())} samples, NIC attached = 1")

    with step(3, f"{FLAPS} lower flaps, each reattached with frames both ways", run):
        figures = []
        for flap in range(1, FLAPS + 1):
            swaps = run.wait_nic("attached")["swaps"]
            host.run(f"ip link del {LOWER}")
            run.wait_nic("waiting-lower")
            frames = run.probe("up")
            now = run.wait_nic("attached")
            assert now["swaps"] == swaps + 1, (swaps, now)
            figures.append(frames["in_ms"])
            print(f"  flap {flap}: lower up -> frames through after {frames['in_ms']:.1f} ms "
                  f"(out {frames['out_ms']:.1f} ms), {now['ifname']} ifindex {now['ifindex']}")
        print(f"  {FLAPS} flaps: lower up -> frames median {sorted(figures)[len(figures) // 2]:.1f} ms, "
              f"max {max(figures):.1f} ms")

    with step(4, "systemctl reload re-reads the config and leaves the NIC alone", run):
        before, pid = run.wait_nic("attached"), run.prop("MainPID")
        host.run(f"cat >> /etc/netwatch/netwatch.toml <<'EOF'\n{CONFIG_VM2}EOF")
        host.run("systemctl reload netwatch", timeout=30)
        run.wait_nic("waiting-vm", vm="vm2")
        assert run.prop("MainPID") == pid and run.prop("ActiveState") == "active"
        run.adopted(before, "reload")

    with step(5, "systemctl restart adopts the backend", run):
        before, pid = run.wait_nic("attached"), run.prop("MainPID")
        host.run("systemctl restart netwatch", timeout=60)
        run.wait_active(not_pid=pid)
        after = run.adopted(before, "restart")
        print(f"  same {after['ifname']} ifindex {after['ifindex']}, netdev {after['netdev']}, swaps {after['swaps']}")

    with step(6, "the watchdog kills a stopped netwatch; the new one adopts the backend", run):
        before, pid, restarts = run.wait_nic("attached"), run.prop("MainPID"), int(run.prop("NRestarts"))
        stopped = time.monotonic()
        host.run(f"kill -STOP {pid}")
        run.wait_active(WATCHDOG_DEADLINE, not_pid=pid)
        took = time.monotonic() - stopped
        assert int(run.prop("NRestarts")) == restarts + 1
        log = host.out("journalctl -u netwatch --no-pager -o cat")
        assert "Watchdog timeout" in log, "no 'Watchdog timeout' in the journal"
        run.adopted(before, "the watchdog restart")
        print(f"  SIGSTOP -> killed by the watchdog and running again after {took:.1f} s")

    with step(7, "journal: catalog text (-x) and NETWATCH_* fields with MESSAGE_ID", run):
        explained = host.out("journalctl -x -u netwatch --no-pager")
        for kind in ("lower-lost", "lower-back"):
            subject = re.search(rf"^-- {EVENT_KINDS[kind].message_id}\nSubject: (.*)$", catalog, re.M)
            assert subject, f"{kind} is not in units/netwatch.catalog"
            assert subject.group(1) in explained, f"journalctl -x does not explain {kind}: {subject.group(1)!r}"
            entries = run.journal(f"NETWATCH_EVENT={kind}")
            assert len(entries) >= FLAPS, f"{len(entries)} {kind} entries for {FLAPS} flaps"
            for entry in entries:
                got = (entry.get("NETWATCH_VM"), entry.get("NETWATCH_NIC"), entry.get("NETWATCH_LOWER"),
                       entry.get("MESSAGE_ID"))
                assert got == ("vm1", "net0", LOWER, EVENT_KINDS[kind].message_id), entry

    with step(8, "control_group: members may use the CLI; the socket is theirs and no one else's", run):
        member = host.run("runuser -u nwuser -- netwatch status", check=False)
        assert member.returncode == 0 and "vm1" in member.stdout, member.stdout + member.stderr
        stranger = host.run("runuser -u nobody -- netwatch status", check=False)
        assert stranger.returncode != 0, f"a non-member used the CLI: {stranger.stdout}"
        sock = json.loads(host.out(
            "python3 -c 'import grp, json, os; s = os.stat(\"/run/netwatch/control.sock\"); "
            "acl = os.getxattr(\"/run/netwatch/control.sock\", \"system.posix_acl_access\") "
            "if \"system.posix_acl_access\" in os.listxattr(\"/run/netwatch/control.sock\") else b\"\"; "
            "print(json.dumps({\"group\": grp.getgrgid(s.st_gid).gr_name, \"mode\": s.st_mode & 0o777, "
            "\"acl\": acl.hex(), \"gid\": grp.getgrnam(\"netwatch\").gr_gid}))'"))
        print(f"  control.sock: group {sock['group']}, mode {sock['mode']:o}, "
              f"ACL {'grants group netwatch rw' if _acl_grants(sock['acl'], sock['gid']) else 'none for netwatch'}")
        assert sock["mode"] & 0o007 == 0, "the control socket is open to others"
        assert (sock["group"] == "netwatch" and sock["mode"] == 0o660) or _acl_grants(sock["acl"], sock["gid"]), \
            "the control socket is neither group-owned 0660 nor open to the group by an ACL"

    with step(9, "systemd-analyze security netwatch.service", run):
        out = host.out("systemd-analyze security netwatch.service --no-pager")
        score = re.search(r"Overall exposure level for netwatch.service: ([0-9.]+)", out)
        assert score, out
        print(f"  exposure level {score.group(1)}")
        assert float(score.group(1)) <= MAX_EXPOSURE, out

    _redirect_steps(run)


def _redirect_steps(run: Run) -> None:
    host = run.host
    with step(10, "a redirect NIC beside the macvtap one: the unit's drop-in, then its tap before any QEMU", run):
        host.run(f"install -d /etc/systemd/system/netwatch.service.d && install -m 644 "
                 f"{SRC_INSIDE}/units/{REDIRECT_DROP_IN} /etc/systemd/system/netwatch.service.d/redirect.conf")
        host.run(f"cat >> /etc/netwatch/netwatch.toml <<'EOF'\n{CONFIG_VM3}EOF")
        host.write(REDIRECT_PROBE_PATH, REDIRECT_PROBE)
        pid = run.prop("MainPID")
        host.run("systemctl daemon-reload && systemctl restart netwatch", timeout=60)
        run.wait_active(not_pid=pid)
        # Merged with the unit's RestrictNamespaces=yes: those two, and no other.
        assert sorted(run.prop("RestrictNamespaces").split()) == ["net", "user"], run.prop("RestrictNamespaces")
        run.wait_nic("waiting-vm", vm="vm3")
        tap = host.out(f"ip -d link show {REDIRECT_TAP}")
        assert "tun type tap" in tap and "persist on" in tap and "vnet_hdr on" in tap, tap
        print(f"  {REDIRECT_TAP}: persistent tap with a vnet header, made before its VM runs")

    with step(11, "QEMU (a unit of the container's systemd) opens the tap; frames pass; a lower flap re-joins it",
              run):
        args = json.loads(host.out("netwatch qemu-args --json vm3"))
        assert any(f"ifname={REDIRECT_TAP}" in arg for arg in args), args
        qemu = ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-display", "none", "-nodefaults",
                "-no-user-config", "-m", "64", "-name", "vm3", "-global", "virtio-net-pci.romfile=", *args]
        host.run(f"systemd-run --quiet --collect --unit=nwt-qemu3 {shlex.join(qemu)}")
        first = run.wait_nic("attached", vm="vm3")
        assert first["macvlan"], first
        frames = _redirect_probe(run)
        print(f"  {first['macvlan']} on {LOWER} joined to {REDIRECT_TAP}; wire -> tap in {frames['in_ms']:.1f} ms")
        host.run(f"ip link del {LOWER}")
        run.wait_nic("waiting-lower", vm="vm3")
        frames = _redirect_probe(run, "up")
        now = run.wait_nic("attached", vm="vm3")
        # The same tap (QEMU was never told), joined again by a new macvlan.
        assert (now["ifname"], now["ifindex"], now["swaps"]) == (first["ifname"], first["ifindex"],
                                                                 first["swaps"] + 1), (first, now)
        print(f"  lower up -> wire to tap after {frames['in_ms']:.1f} ms, the guest's MAC announced on the wire "
              f"after {frames['rarp_ms']:.1f} ms")

    with step(12, "the sandbox refused nothing: kernel check answered, no error entry; exposure with the drop-in",
              run):
        invocation = run.prop("InvocationID")
        log = host.out(f"journalctl -u netwatch _SYSTEMD_INVOCATION_ID={invocation} -o cat --no-pager")
        # The kernel check made its tap, macvlan and filters in its own namespaces, under the sandbox.
        assert 'the kernel has what wiring = "redirect" needs' in log and "could not check" not in log, log
        refused = [line for line in log.splitlines() if any(
            words in line for words in ("Operation not permitted", "Permission denied", "not supported"))]
        assert refused == [], refused
        # (The announcement's packet socket: its frames were seen on the wire in step 11.)
        errors = [entry.get("MESSAGE") for entry in run.journal(f"_SYSTEMD_INVOCATION_ID={invocation}", "-p", "err")]
        assert errors == [], f"netwatch logged errors: {errors}"
        out = host.out("systemd-analyze security netwatch.service --no-pager")
        score = re.search(r"Overall exposure level for netwatch.service: ([0-9.]+)", out)
        assert score, out
        print(f"  exposure level with {REDIRECT_DROP_IN}: {score.group(1)}")
        assert float(score.group(1)) <= MAX_EXPOSURE_REDIRECT, out


def _redirect_probe(run: Run, mode: str = "probe") -> dict[str, float]:
    done = run.host.run(f"{VENV_PYTHON} {REDIRECT_PROBE_PATH} {mode}", check=False, timeout=40)
    line = next((line for line in done.stdout.splitlines() if line.startswith("PROBE ")), None)
    assert done.returncode == 0 and line, f"frames did not pass: {done.stdout}{done.stderr}"
    return dict(json.loads(line.split(" ", 1)[1]))


def _acl_grants(acl_hex: str, gid: int) -> bool:
    """Whether a system.posix_acl_access value gives group ``gid`` read and write (through the mask)."""
    data = bytes.fromhex(acl_hex)
    entries = [(int.from_bytes(data[i:i + 2], "little"), int.from_bytes(data[i + 2:i + 4], "little"),
                int.from_bytes(data[i + 4:i + 8], "little")) for i in range(4, len(data), 8)]
    named = any(tag == 0x08 and ident == gid and perm & 6 == 6 for tag, perm, ident in entries)
    mask = next((perm for tag, perm, _ in entries if tag == 0x10), 7)
    return named and mask & 6 == 6
