"""A throwaway libvirt for a test: Debian's libvirtd and virtlogd, walled off from the host.

Both daemons run in the test's network namespace (no bridge, firewall rule
or tap of theirs reaches the host's network) and in a private mount
namespace whose /run, /etc/libvirt and /var/{lib,log,cache}/libvirt are
bind mounts of directories under the test's temp dir: nothing they write
persists, and a libvirt the admin runs is neither seen nor disturbed. The
private /etc/libvirt holds empty config files only, so the daemons run on
Debian's compiled-in defaults (QEMU as libvirt-qemu, DAC labelling,
cgroups, seccomp sandbox) with no network, pool, nwfilter or domain of the
host's copied in: nothing autostarts, no dnsmasq.

The network namespace gets its own sysfs (so libvirtd sees the namespace's
links); the host's cgroup mounts are carried over beneath it, so libvirt
puts each QEMU in a cgroup of its own as it would on a real host. The
cgroup directories libvirt leaves behind (its "machine" partition) are
removed on close. With ``own_cgroups`` the daemons get a cgroup subtree
and a cgroup namespace of their own instead, as a second host would: its
"machine" partition is then that subtree's, so two of them on one machine
do not share ``machine/qemu-1-NAME.libvirt-qemu`` (each numbers its domains
from 1), and everything under it goes on close.

With ``hooks``, a recorder is installed as /etc/libvirt/hooks/qemu.d/recorder
(libvirt >= 6.5) before libvirtd starts: each call appends one JSON line
(argv, times, ids, environment, stdin, the status file and pid file as they
are at that moment, the QEMU's cgroups, the namespace's links and taps) to
``hook-records.jsonl`` (``hook_records()``); ``control_hook()`` makes a
call run a command, sleep or fail. ``hook_scripts`` installs other qemu.d
scripts (netwatch's) the same way.

Both daemons are children of the test (libvirtd in the foreground, virtlogd
without -d), ended by pid; the QEMUs libvirt daemonizes are found by their
``-name guest=...`` and reported (and killed by pid) if any outlives close.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import uuid as uuid_mod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from netwatch.sandbox.testbed import Deadline, Netns, _die_with_parent, wait_until

# Debian's compiled-in QEMU user and group (qemu.conf leaves them commented out).
QEMU_USER = "libvirt-qemu"
QEMU_GROUP = "libvirt-qemu"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
PACKAGES = ("libvirt-daemon-system", "libvirt-clients")
BINARIES = ("libvirtd", "virtlogd", "virsh", "nsenter", "unshare")
# Where the private copies are mounted, by the name of their directory under ours.
MOUNTS = {"run": "/run", "etc": "/etc/libvirt", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt",
          "cache": "/var/cache/libvirt"}
CGROUP_ROOT = "/sys/fs/cgroup"
HOOK_RECORDS = "hook-records.jsonl"
HOOK_CONTROL = "hook-control.json"

# The recorder libvirtd runs as /etc/libvirt/hooks/qemu.d/recorder. It runs in
# libvirtd's namespaces (its /run is the private one), with the environment
# libvirtd gives hooks. hook-control.json maps "OP SUBOP" (e.g. "migrate
# begin") to {"run": shell command, "sleep": seconds, "say": text for stderr,
# "exit": code}: how to answer that call.
RECORDER = r"""#!/usr/bin/python3
import json, os, subprocess, sys, time
ROOT = {root!r}
started = (time.time(), time.monotonic())
data = sys.stdin.read()
name = sys.argv[1] if len(sys.argv) > 1 else ""

def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None

pid_text = read(f"/run/libvirt/qemu/{{name}}.pid")
qemu = {{}}
if pid_text and pid_text.strip().isdigit():
    pid = pid_text.strip()
    stat = read(f"/proc/{{pid}}/stat")
    qemu = {{"pid": int(pid), "alive": stat is not None, "cgroup": read(f"/proc/{{pid}}/cgroup")}}
    if stat:  # when it started, on the time.time() clock (its start is in ticks since boot)
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        qemu["started"] = started[0] - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
machines = {{}}
for hierarchy in ("unified", "cpu"):
    base = f"/sys/fs/cgroup/{{hierarchy}}/machine"
    if os.path.isdir(base):
        for group in sorted(os.listdir(base)):
            if name in group:
                for path, _dirs, _files in os.walk(f"{{base}}/{{group}}"):
                    procs = read(f"{{path}}/cgroup.procs") or ""
                    machines[path[len("/sys/fs/cgroup/"):]] = procs.split()
try:
    links = sorted(os.listdir("/sys/class/net"))
except OSError:
    links = []
taps = {{link: (read(f"/sys/class/net/{{link}}/carrier") or "?").strip() for link in links
        if os.path.exists(f"/sys/class/net/{{link}}/tun_flags")}}
key = " ".join(sys.argv[2:4])
control = json.loads(read(os.path.join(ROOT, {control!r})) or "{{}}").get(key, {{}})
record = {{"argv": sys.argv[1:], "time": started[0], "monotonic": started[1], "uid": os.getuid(),
          "euid": os.geteuid(), "gid": os.getgid(), "pid": os.getpid(), "ppid": os.getppid(),
          "cwd": os.getcwd(), "umask": os.umask(0o022), "env": dict(os.environ), "stdin": data,
          "status_xml": read(f"/run/libvirt/qemu/{{name}}.xml"), "pid_file": pid_text, "qemu": qemu,
          "machine_cgroups": machines, "links": links, "taps": taps, "control": control}}
with open(os.path.join(ROOT, {records!r}), "a") as f:
    f.write(json.dumps(record) + "\n")
if control.get("run"):
    subprocess.run(control["run"], shell=True)
if control.get("sleep"):
    time.sleep(control["sleep"])
if control.get("say"):
    sys.stderr.write(control["say"])
sys.exit(int(control.get("exit", 0)))
"""


class Startable(Protocol):
    def start(self) -> Any: ...

    def close(self) -> list[str]: ...


S = TypeVar("S", bound=Startable)


@contextlib.contextmanager
def running(host: S, test: str) -> Iterator[S]:
    """``host`` (a LibvirtHost or a pair of them) started for ``test``: a libvirt that cannot start fails
    the test loudly with why; whatever it left behind fails it too (after being removed)."""
    import pytest
    try:
        host.start()
    except LibvirtUnavailable as exc:
        problems = host.close()
        print(f"\n*** {test} CANNOT RUN: {exc} ***", *problems, sep="\n")
        pytest.fail(f"libvirt unavailable: {exc}", pytrace=False)
    try:
        yield host
    finally:
        problems = host.close()
        assert not problems, "left behind (now removed):\n" + "\n".join(problems)


class LibvirtUnavailable(RuntimeError):
    """libvirt is not installed or did not start: the reason, in one sentence."""


def _controllers() -> set[str]:
    """The cgroup controllers this kernel has (/proc/cgroups)."""
    lines = Path("/proc/cgroups").read_text().splitlines()[1:]
    return {line.split()[0] for line in lines if line.strip()}


def missing() -> list[str]:
    """What this host lacks to run the test's libvirt (empty: nothing)."""
    lacking = [name for name in BINARIES if shutil.which(name) is None]
    try:
        pwd.getpwnam(QEMU_USER)
        grp.getgrnam(QEMU_GROUP)
    except KeyError:
        lacking.append(f"the user/group {QEMU_USER} (made by libvirt-daemon-system)")
    return lacking


@dataclass(frozen=True)
class HookRecord:
    """One call of libvirt's qemu hook, as the recorder saw it."""

    argv: tuple[str, ...]  # name, op, subop, extra
    time: float  # time.time() at the call
    monotonic: float  # time.monotonic() at the call: comparable with the test's
    uid: int
    env: dict[str, str]
    stdin: str  # the domain XML libvirt handed the hook
    status_xml: str | None  # /run/libvirt/qemu/NAME.xml at that moment (None: no such file)
    pid_file: str | None  # /run/libvirt/qemu/NAME.pid at that moment
    qemu: dict[str, Any]  # the pid file's process: pid, alive, cgroup (its /proc/PID/cgroup)
    machine_cgroups: dict[str, list[str]]  # libvirt's groups for the domain then, with their pids
    links: tuple[str, ...]  # the links of libvirtd's network namespace then
    taps: dict[str, str]  # its tun/tap links: carrier ("1": an fd attached)

    @property
    def op(self) -> str:
        """``OP SUBOP``, e.g. ``"stopped end"``."""
        return " ".join(self.argv[1:3])


class LibvirtHost:
    """libvirtd + virtlogd in ``ns`` and a private mount namespace; files under ``root``."""

    def __init__(self, root: Path, ns: Netns, host_uuid: str | None = None, own_cgroups: bool = False,
                 hooks: bool = False, hook_scripts: dict[str, str] | None = None) -> None:
        self.root = root
        self.ns = ns
        self.uri = f"qemu:///system?socket={root / 'run' / 'libvirt' / 'libvirt-sock'}"
        # libvirt refuses a migration between two hosts with the same host UUID ("the same host").
        self.host_uuid = host_uuid or str(uuid_mod.uuid4())
        self.own_cgroups = own_cgroups
        self.hooks = hooks
        self.hook_scripts = hook_scripts or {}  # name -> text: more qemu.d scripts (netwatch's own, say)
        self.virtlogd: subprocess.Popen[bytes] | None = None
        self.libvirtd: subprocess.Popen[bytes] | None = None
        self.domains: set[str] = set()  # names this test defined: how its QEMUs are found
        self._cgroups_before = self._machine_cgroups()
        self._subtree: list[Path] = []  # with own_cgroups: our group in each hierarchy

    # -- life ------------------------------------------------------------------

    def start(self) -> LibvirtHost:
        lacking = missing()
        if lacking:
            raise LibvirtUnavailable(f"libvirt is not installed here (no {', '.join(lacking)}); the test command "
                                     f"installs {' '.join(PACKAGES)} (tools/bootstrap.sh test)")
        self._make_dirs()
        if self.own_cgroups:
            self._make_subtree()
        script = self.root / "enter.sh"
        script.write_text(self._enter_script())
        unshare = ["unshare", "--mount", "--propagation", "private"]
        if self.own_cgroups:
            unshare.insert(1, "--cgroup")
        with open(self.root / "virtlogd.log", "ab") as log:
            # unshare and nsenter exec: this Popen's pid is virtlogd's.
            self.virtlogd = subprocess.Popen([*unshare, "sh", str(script)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             preexec_fn=self._child_setup)
        sock = self.root / "run" / "libvirt" / "virtlogd-sock"
        wait_until(lambda: sock.exists() or self.virtlogd is None or self.virtlogd.poll() is not None, 20,
                   "virtlogd to listen", self.dump)
        if not sock.exists():
            raise LibvirtUnavailable(f"virtlogd did not start: {self._tail('virtlogd.log')}")
        self.start_libvirtd()
        return self

    def start_libvirtd(self) -> None:
        """libvirtd joins virtlogd's namespaces (the mounts above; the test's netns; its cgroups)."""
        assert self.virtlogd is not None
        enter = ["nsenter", "-F", "-t", str(self.virtlogd.pid), "-m", "-n", *(["-C"] if self.own_cgroups else [])]
        with open(self.root / "libvirtd.log", "ab") as log:
            self.libvirtd = subprocess.Popen([*enter, "libvirtd"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             preexec_fn=self._child_setup)
        wait_until(lambda: self._answers() or self.libvirtd is None or self.libvirtd.poll() is not None, 30,
                   "libvirtd to answer virsh", self.dump, interval=0.1)
        if not self._answers():
            raise LibvirtUnavailable(f"libvirtd did not start: {self._tail('libvirtd.log')}")

    def stop_libvirtd(self) -> None:
        """SIGTERM libvirtd alone, as ``systemctl stop libvirtd`` does: its QEMUs run on."""
        if self.libvirtd is not None and self.libvirtd.poll() is None:
            self.libvirtd.send_signal(signal.SIGTERM)
            self.libvirtd.wait(30)
        self.libvirtd = None

    def restart_libvirtd(self) -> None:
        """libvirtd stopped and started again: it reconnects to the QEMUs still running."""
        self.stop_libvirtd()
        self.start_libvirtd()

    def _child_setup(self) -> None:
        """In a daemon's child before exec: into our cgroups (own_cgroups), killed with the test."""
        for group in self._subtree:
            (group / "cgroup.procs").write_text(str(os.getpid()))
        _die_with_parent()

    def _make_dirs(self) -> None:
        for name in MOUNTS:
            (self.root / name).mkdir(parents=True)
        # Debian's compiled-in defaults, none of the host's domains or networks.
        for conf in ("libvirtd.conf", "virtlogd.conf"):
            (self.root / "etc" / conf).write_text("# netwatch test: compiled-in defaults\n")
        # But no private /dev per QEMU: libvirt moves the mounts it finds under
        # /dev into it and fails on the file mounted over /dev/kvm ("Unable to
        # move ... mount to /dev/kvm: Invalid argument"). netwatch hands QEMU
        # open fds, so QEMU's view of /dev does not matter to it.
        (self.root / "etc" / "qemu.conf").write_text("# netwatch test: compiled-in defaults but\nnamespaces = []\n")
        (self.root / "etc" / "libvirtd.conf").write_text(f'# netwatch test: compiled-in defaults but\n'
                                                         f'host_uuid = "{self.host_uuid}"\n')
        scripts = dict(self.hook_scripts)
        if self.hooks:
            scripts["recorder"] = RECORDER.format(root=str(self.root), control=HOOK_CONTROL, records=HOOK_RECORDS)
        # Before libvirtd starts: only a libvirtd that found a qemu hook at its start
        # (or at a SIGHUP) calls any; it then runs every script qemu.d holds at
        # each call, in name order.
        for name, text in scripts.items():
            path = self.root / "etc" / "hooks" / "qemu.d" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o755)
        # QEMU (as libvirt-qemu) reaches files the test hands it through here.
        os.chmod(self.root, 0o711)

    def _enter_script(self) -> str:
        """Run by ``unshare --mount`` in the host's netns: mounts, then virtlogd in the test's netns."""
        hold = self.root / "cgroup-hold"
        # The netns is reached through an fd: the bind mount over /run hides /run/netns.
        lines = ["set -e", f"exec 3< /run/netns/{self.ns.name}"]
        lines += [f"mount --bind {self.root / name} {target}" for name, target in MOUNTS.items()]
        if os.path.exists("/dev/kvm"):
            # Here /dev/kvm is root's alone (no udev to give it to group kvm).
            # libvirt probes QEMU with CAP_DAC_OVERRIDE (KVM found) but then
            # judges KVM by what libvirt-qemu may open (not usable), calls its
            # cached capabilities outdated and probes again, ~4 s, at every
            # lookup: 40 s for one define. An empty file in its place makes
            # both say "no KVM"; the domains are TCG anyway.
            no_kvm = self.root / "no-kvm"
            no_kvm.touch(mode=0o600)
            lines.append(f"mount --bind {no_kvm} /dev/kvm")
        if os.path.ismount(CGROUP_ROOT) and not self.own_cgroups:
            # The netns needs a sysfs of its own, mounted over /sys, which hides
            # the cgroup mounts: keep hold of them and put them back on top.
            hold.mkdir()
            lines.append(f"mount --rbind {CGROUP_ROOT} {hold}")
        inner = ["set -e", "mount -t sysfs sysfs /sys"]
        if os.path.ismount(CGROUP_ROOT) and not self.own_cgroups:
            inner.append(f"mount --move {hold} {CGROUP_ROOT}")
        elif self.own_cgroups:
            # Mounted afresh in the cgroup namespace, each hierarchy shows our
            # subtree as its root, as a container's do.
            inner.append(f"mount -t tmpfs -o mode=755 cgroup {CGROUP_ROOT}")
            for mount, fstype, options in self._hierarchy_mounts():
                inner += [f"mkdir -p {mount}", f"mount -t {fstype} -o {options} {fstype} {mount}"]
                controllers = Path(mount) / "cgroup.controllers"
                if fstype == "cgroup2" and controllers.read_text().strip():
                    # libvirt uses the unified hierarchy (the QEMU's group in it, its
                    # device filter) only if the mount's root lists a controller, as
                    # the machine's root does here; our subtree's lists none (the
                    # root enables none for its children). Show it the root's list.
                    copy = self.root / "cgroup.controllers"
                    copy.write_text(controllers.read_text())
                    inner.append(f"mount --bind {copy} {controllers}")
        inner += ["exec 3<&-", "exec virtlogd"]
        lines.append(f"exec nsenter -F --net=/proc/self/fd/3 sh -c '{'; '.join(inner)}'")
        return "\n".join(lines) + "\n"

    def _answers(self) -> bool:
        return self.run_virsh("uri").returncode == 0

    def close(self) -> list[str]:
        """Stop everything; what was left behind (and has now been removed), one line each."""
        problems: list[str] = []
        if self.libvirtd is not None and self.libvirtd.poll() is None:
            for name in self.run_virsh("list", "--name").stdout.split():
                self.run_virsh("destroy", name)
            # What is left is defined (a transient domain went with its destroy).
            for name in self.run_virsh("list", "--all", "--name").stdout.split():
                result = self.run_virsh("undefine", "--managed-save", name)
                if result.returncode != 0:
                    problems.append(f"virsh undefine {name}: {result.stderr.strip()}")
        for what, proc in (("libvirtd", self.libvirtd), ("virtlogd", self.virtlogd)):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    problems.append(f"{what} (pid {proc.pid}) ignored SIGTERM for 20 s: killed")
                    proc.kill()
                    proc.wait(10)
        self.libvirtd = self.virtlogd = None
        for pid in self.qemu_pids():
            problems.append(f"a QEMU of this test (pid {pid}) outlived libvirtd: killed")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            wait_until(lambda: not self.qemu_pids(), 10, "this test's QEMUs to be gone")
        except Deadline as exc:
            problems.append(str(exc))
        problems += self._remove_subtree() if self.own_cgroups else self._remove_cgroups()
        leftover = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(self.root) in line]
        problems += [f"mount left on the host: {line}" for line in leftover]
        return problems

    # -- cgroups ---------------------------------------------------------------

    @staticmethod
    def _hierarchies() -> list[Path]:
        mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        return [Path(fields[4]) for fields in mounts
                if fields[4].startswith(CGROUP_ROOT) and fields[fields.index("-") + 1] in ("cgroup", "cgroup2")]

    @staticmethod
    def _hierarchy_mounts() -> list[tuple[str, str, str]]:
        """(mount point, cgroup or cgroup2, mount options) of each cgroup hierarchy mounted here."""
        found = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fields[4].startswith(CGROUP_ROOT + "/") and fstype in ("cgroup", "cgroup2"):
                supers = [o for o in fields[fields.index("-") + 3].split(",") if o not in ("rw", "ro")]
                if fstype == "cgroup":  # the hierarchy's controllers and name: what mounts it again
                    supers = [o for o in supers if o in _controllers() or o.startswith("name=")]
                    if not any(o in _controllers() for o in supers):
                        supers.insert(0, "none")
                found.append((fields[4], fstype, ",".join(supers) or "defaults"))
        return found

    def _make_subtree(self) -> None:
        """A group of ours under our own in each hierarchy (cpuset's given its parent's cpus and mems)."""
        mine = {tuple(sorted(line.split(":", 2)[1].split(","))): line.split(":", 2)[2]
                for line in Path("/proc/self/cgroup").read_text().splitlines()}
        name = f"nwlv-{uuid_mod.uuid4().hex[:8]}"
        for mount, fstype, options in self._hierarchy_mounts():
            key = ("",) if fstype == "cgroup2" else tuple(sorted(o for o in options.split(",") if o != "none"))
            placement = mine.get(key)
            if placement is None:
                continue
            group = Path(mount + placement.rstrip("/")) / name
            group.mkdir()
            self._subtree.append(group)
            for inherited in ("cpuset.cpus", "cpuset.mems"):
                if (group / inherited).exists():
                    (group / inherited).write_text((group.parent / inherited).read_text())

    def _remove_subtree(self) -> list[str]:
        """Our groups, and what libvirt made under them, bottom up (a group with a process stays: reported)."""
        problems = []
        for group in self._subtree:
            for path in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    path.rmdir()
            try:
                group.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"cgroup {group} not removed: {exc.strerror}")
        return problems

    def _machine_cgroups(self) -> set[Path]:
        return {path for path in (h / "machine" for h in self._hierarchies()) if path.is_dir()}

    def _remove_cgroups(self) -> list[str]:
        """libvirt removes each QEMU's cgroup but keeps its "machine" partition: remove what we made.

        Only our domains' cgroups (libvirt names them qemu-ID-NAME.libvirt-qemu)
        and a "machine" that was not there before are touched; rmdir fails on
        a cgroup that still has processes or children, so nothing live goes.
        """
        problems = []
        for machine in self._machine_cgroups():
            for domain in (p for p in machine.iterdir() if p.is_dir()
                           and any(f"-{name}." in p.name for name in self.domains)):
                problems.append(f"cgroup left by libvirt: {domain}")
                for path in sorted((p for p in domain.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    with contextlib.suppress(OSError):
                        path.rmdir()
                with contextlib.suppress(OSError):
                    domain.rmdir()
            if machine not in self._cgroups_before:
                with contextlib.suppress(OSError):
                    machine.rmdir()
        problems += [f"cgroup left: {path}" for path in self._machine_cgroups() - self._cgroups_before]
        return problems

    # -- using it ----------------------------------------------------------------

    def run_virsh(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True,
                              timeout=timeout)

    def virsh(self, *args: str, timeout: float = 60) -> str:
        """A virsh command that must succeed; its output."""
        result = self.run_virsh(*args, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def define(self, name: str, xml: str) -> None:
        self.domains.add(name)
        path = self.root / f"{name}.xml"
        path.write_text(xml)
        self.virsh("define", str(path))

    def qemu_pids(self) -> list[int]:
        """Live QEMUs started for this test's domains (found by their -name guest=... and netns)."""
        pids = []
        try:
            netns = os.stat(f"/run/netns/{self.ns.name}").st_ino
        except OSError:
            netns = None  # the namespace is gone: any QEMU of ours left is reported
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                inside = netns is None or os.stat(entry / "ns" / "net").st_ino == netns
            except OSError:
                continue
            if state != "Z" and inside and any(arg.startswith(f"guest={name},".encode()) for name in self.domains
                                               for arg in argv):
                pids.append(int(entry.name))
        return pids

    def hook_records(self) -> list[HookRecord]:
        """Every call of the recorder hook so far, in order."""
        path = self.root / HOOK_RECORDS
        lines = path.read_text().splitlines() if path.exists() else []
        records = []
        for line in lines:
            raw = json.loads(line)
            records.append(HookRecord(argv=tuple(raw["argv"]), time=raw["time"], monotonic=raw["monotonic"],
                                      uid=raw["uid"], env=raw["env"], stdin=raw["stdin"],
                                      status_xml=raw["status_xml"], pid_file=raw["pid_file"], qemu=raw["qemu"],
                                      machine_cgroups=raw["machine_cgroups"], links=tuple(raw["links"]),
                                      taps=raw["taps"]))
        return records

    def control_hook(self, answers: dict[str, dict[str, Any]]) -> None:
        """How the recorder answers from now on: {"OP SUBOP": {"run": cmd, "sleep": s, "say": text, "exit": code}}."""
        (self.root / HOOK_CONTROL).write_text(json.dumps(answers))

    def status_file(self, name: str) -> Path:
        """libvirt's status XML of a running domain, as seen from outside its mount namespace."""
        return self.root / "run" / "libvirt" / "qemu" / f"{name}.xml"

    def qemu_log(self, name: str) -> str:
        return self._tail(f"log/qemu/{name}.log", 6000)

    def _tail(self, relative: str, size: int = 3000) -> str:
        try:
            return (self.root / relative).read_text(errors="replace")[-size:]
        except OSError as exc:
            return f"({relative}: {exc.strerror})"

    def dump(self, name: str | None = None) -> str:
        parts = ["== libvirtd log (tail)", self._tail("libvirtd.log"), "== virtlogd log (tail)",
                 self._tail("virtlogd.log")]
        for domain in [name] if name else sorted(self.domains):
            xml = self.run_virsh("dumpxml", domain)
            parts += [f"== virsh dumpxml {domain}", xml.stdout or xml.stderr,
                      f"== QEMU log of {domain} (tail)", self.qemu_log(domain)]
        return "\n".join(parts)

