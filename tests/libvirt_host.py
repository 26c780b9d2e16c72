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
removed on close.

Both daemons are children of the test (libvirtd in the foreground, virtlogd
without -d), ended by pid; the QEMUs libvirt daemonizes are found by their
``-name guest=...`` and reported (and killed by pid) if any outlives close.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path

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


class LibvirtUnavailable(RuntimeError):
    """libvirt is not installed or did not start: the reason, in one sentence."""


def missing() -> list[str]:
    """What this host lacks to run the test's libvirt (empty: nothing)."""
    lacking = [name for name in BINARIES if shutil.which(name) is None]
    try:
        pwd.getpwnam(QEMU_USER)
        grp.getgrnam(QEMU_GROUP)
    except KeyError:
        lacking.append(f"the user/group {QEMU_USER} (made by libvirt-daemon-system)")
    return lacking


class LibvirtHost:
    """libvirtd + virtlogd in ``ns`` and a private mount namespace; files under ``root``."""

    def __init__(self, root: Path, ns: Netns) -> None:
        self.root = root
        self.ns = ns
        self.uri = f"qemu:///system?socket={root / 'run' / 'libvirt' / 'libvirt-sock'}"
        self.virtlogd: subprocess.Popen[bytes] | None = None
        self.libvirtd: subprocess.Popen[bytes] | None = None
        self.domains: set[str] = set()  # names this test defined: how its QEMUs are found
        self._cgroups_before = self._machine_cgroups()

    # -- life ------------------------------------------------------------------

    def start(self) -> LibvirtHost:
        lacking = missing()
        if lacking:
            raise LibvirtUnavailable(f"libvirt is not installed here (no {', '.join(lacking)}); the test command "
                                     f"installs {' '.join(PACKAGES)} (tools/bootstrap.sh test)")
        self._make_dirs()
        script = self.root / "enter.sh"
        script.write_text(self._enter_script())
        with open(self.root / "virtlogd.log", "ab") as log:
            # unshare and nsenter exec: this Popen's pid is virtlogd's.
            self.virtlogd = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", str(script)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             preexec_fn=_die_with_parent)
        sock = self.root / "run" / "libvirt" / "virtlogd-sock"
        wait_until(lambda: sock.exists() or self.virtlogd is None or self.virtlogd.poll() is not None, 20,
                   "virtlogd to listen", self.dump)
        if not sock.exists():
            raise LibvirtUnavailable(f"virtlogd did not start: {self._tail('virtlogd.log')}")
        # libvirtd joins virtlogd's namespaces (the mounts above; the test's netns).
        with open(self.root / "libvirtd.log", "ab") as log:
            self.libvirtd = subprocess.Popen(["nsenter", "-F", "-t", str(self.virtlogd.pid), "-m", "-n", "libvirtd"],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             preexec_fn=_die_with_parent)
        wait_until(lambda: self._answers() or self.libvirtd is None or self.libvirtd.poll() is not None, 30,
                   "libvirtd to answer virsh", self.dump, interval=0.1)
        if not self._answers():
            raise LibvirtUnavailable(f"libvirtd did not start: {self._tail('libvirtd.log')}")
        return self

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
        if os.path.ismount(CGROUP_ROOT):
            # The netns needs a sysfs of its own, mounted over /sys, which hides
            # the cgroup mounts: keep hold of them and put them back on top.
            hold.mkdir()
            lines.append(f"mount --rbind {CGROUP_ROOT} {hold}")
        inner = ["set -e", "mount -t sysfs sysfs /sys"]
        if os.path.ismount(CGROUP_ROOT):
            inner.append(f"mount --move {hold} {CGROUP_ROOT}")
        inner += ["exec 3<&-", "exec virtlogd"]
        lines.append(f"exec nsenter -F --net=/proc/self/fd/3 sh -c '{'; '.join(inner)}'")
        return "\n".join(lines) + "\n"

    def _answers(self) -> bool:
        return self.run_virsh("uri").returncode == 0

    def close(self) -> list[str]:
        """Stop everything; what was left behind (and has now been removed), one line each."""
        problems: list[str] = []
        if self.libvirtd is not None and self.libvirtd.poll() is None:
            for name in self.run_virsh("list", "--all", "--name").stdout.split():
                self.run_virsh("destroy", name)
                result = self.run_virsh("undefine", name)
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
        problems += self._remove_cgroups()
        leftover = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(self.root) in line]
        problems += [f"mount left on the host: {line}" for line in leftover]
        return problems

    # -- cgroups ---------------------------------------------------------------

    @staticmethod
    def _hierarchies() -> list[Path]:
        mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        return [Path(fields[4]) for fields in mounts
                if fields[4].startswith(CGROUP_ROOT) and fields[fields.index("-") + 1] in ("cgroup", "cgroup2")]

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
        """Live QEMUs started for this test's domains (found by their -name guest=...)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and any(arg.startswith(f"guest={name},".encode()) for name in self.domains
                                    for arg in argv):
                pids.append(int(entry.name))
        return pids

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

