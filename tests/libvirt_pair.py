"""Two libvirt hosts on one machine, for live migration between them.

Each host is a LibvirtHost (libvirtd + virtlogd, private mounts) in a
network namespace of its own, with a host UUID of its own (libvirt refuses
to migrate to "the same host") and a cgroup subtree and namespace of its
own (each libvirtd numbers its domains from 1: sharing the machine's
cgroup tree, A's and B's QEMU of one domain would share
``machine/qemu-1-NAME.libvirt-qemu`` during a migration).

    switch netns:  bridge "peerbr" 10.79.1.1/24 (the guests' peer), a port that stays (carrier),
                   "wA" and "wB": the other ends of the hosts' lowers
    host A netns:  lower "lo0" (veth to wA), "mig" 10.79.0.1/24 (veth to B's "mig")
    host B netns:  lower "lo0" (veth to wB), "mig" 10.79.0.2/24

The lower has the same name on both hosts, so a domain's XML (a direct
NIC's source dev, a redirect tap joined to it) holds on both.

A migration is ``virsh migrate --live`` from virsh connected to the source,
the destination given as ``qemu+unix:///system?socket=<B's socket>`` (virsh
drives both sides itself: libvirt's default, non-p2p, mode) and the
migration stream as ``--migrateuri tcp://10.79.0.2`` (the destination's
address on the migration link; libvirt picks the port from 49152 up). The
guest's files (kernel, initrd, serial log) are at one path both hosts see,
as on shared storage.

macvtap nodes: libvirt opens a direct NIC's macvtap as /dev/tapIFINDEX, and
/dev is the machine's devtmpfs, while ifindexes are numbered per network
namespace from 1: a macvtap in another namespace with the same ifindex got
that node first and libvirt would open it (another test's NIC). So each
host's namespace starts its ifindexes far apart (veth pairs made and deleted
at start use them up), and ``check_macvtaps`` says when a node is not the
device's.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import uuid as uuid_mod
from dataclasses import dataclass
from pathlib import Path

from netwatch.sandbox.guest import ECHO_PORT, GuestImage, Serial, build
from netwatch.sandbox.testbed import Netns, wait_until

from .libvirt_host import HookRecord, LibvirtHost

PEER = "10.79.1.1"
PEER_MAC = "02:00:00:79:01:01"
LOWER = "lo0"
MIGRATION = {"A": "10.79.0.1", "B": "10.79.0.2"}
# Each host's first ifindex after the burn: far from the few each test namespace uses, apart from each other.
IFINDEX_RANGES = {"A": (1000, 2000), "B": (3000, 4000)}


class HostNetns(Netns):
    """A host's network namespace; once its libvirt runs, commands run in it join its cgroup namespace too.

    So a netwatch started there (testbed.Netwatch runs ``ns.exec_argv``)
    sees a QEMU's cgroup as that host's libvirt made it,
    ``/machine/qemu-ID-NAME.libvirt-qemu/...``, as on a real host; from
    outside it is ``/nwlv-.../machine/...``.
    """

    cgroup_ns: str | None = None

    def exec_argv(self, *argv: str) -> list[str]:
        inner = super().exec_argv(*argv)
        return inner if self.cgroup_ns is None else ["nsenter", f"--cgroup={self.cgroup_ns}", "--", *inner]


@dataclass
class PairHost:
    label: str  # "A" or "B"
    ns: HostNetns
    libvirt: LibvirtHost
    address: str  # on the migration link

    @property
    def socket_uri(self) -> str:
        """This host as a migration destination for virsh connected to the other."""
        return f"qemu+unix:///system?socket={self.libvirt.root / 'run' / 'libvirt' / 'libvirt-sock'}"

    def virsh(self, *args: str, timeout: float = 60) -> str:
        return self.libvirt.virsh(*args, timeout=timeout)

    def hook_records(self, name: str | None = None) -> list[HookRecord]:
        return [r for r in self.libvirt.hook_records() if name is None or r.argv[0] == name]

    def state(self, name: str) -> str:
        """``virsh domstate --reason`` (``shut off (migrated)``...), or "absent"."""
        result = self.libvirt.run_virsh("domstate", "--reason", name)
        return result.stdout.strip() if result.returncode == 0 else "absent"


def direct_nic(mac: str, lower: str = LOWER) -> str:
    """libvirt's own NIC on the lower: a macvtap libvirt makes on each host."""
    return f"""<interface type='direct'>
      <mac address='{mac}'/>
      <source dev='{lower}' mode='bridge'/>
      <model type='virtio'/>
    </interface>"""


def ethernet_nic(mac: str, tap: str) -> str:
    """A NIC on a tap someone else made and keeps (each host's own, same name)."""
    return f"""<interface type='ethernet'>
      <mac address='{mac}'/>
      <target dev='{tap}' managed='no'/>
      <model type='virtio'/>
    </interface>"""


class LibvirtPair:
    """Hosts A and B, a switch, the guests' files; everything under ``root`` and removed on close."""

    def __init__(self, root: Path, hooks: bool = True, hook_scripts: dict[str, dict[str, str]] | None = None) -> None:
        self.root = root
        self.hooks = hooks  # the recorder (tests/libvirt_host.py) on both hosts
        # Per host ("A", "B"): more qemu.d scripts, name -> text, installed before its libvirtd starts.
        self.hook_scripts = hook_scripts or {}
        self.hosts: dict[str, PairHost] = {}
        self.switch: Netns | None = None
        self._stack = contextlib.ExitStack()
        self._image: GuestImage | None = None

    def __getitem__(self, label: str) -> PairHost:
        return self.hosts[label]

    # -- life ------------------------------------------------------------------

    def start(self) -> LibvirtPair:
        """The network, then both libvirts (LibvirtUnavailable if they cannot start: close() still cleans up)."""
        # QEMU, as libvirt-qemu, must reach the guests' files below root.
        os.chmod(self.root, 0o711)
        self.switch = self._stack.enter_context(Netns("nwpsw"))
        sw = self.switch
        sw.ip("link", "add", "peerbr", "address", PEER_MAC, "type", "bridge")
        sw.ip("link", "set", "peerbr", "up")
        sw.ip("addr", "add", f"{PEER}/24", "dev", "peerbr")
        # A port that stays: the bridge keeps its carrier whatever comes and goes.
        sw.ip("link", "add", "swkeep", "type", "veth", "peer", "name", "swkeep2")
        sw.ip("link", "set", "swkeep2", "up")
        sw.ip("link", "set", "swkeep", "master", "peerbr", "up")
        namespaces: dict[str, HostNetns] = {}
        for label in MIGRATION:
            ns = HostNetns(f"nwp{label}")
            self._stack.enter_context(ns)
            self._burn_ifindexes(ns, random.randrange(*IFINDEX_RANGES[label]))
            ns.ip("link", "add", LOWER, "type", "veth", "peer", "name", f"w{label}", "netns", sw.name)
            sw.ip("link", "set", f"w{label}", "master", "peerbr", "up")
            ns.ip("link", "set", LOWER, "up")
            namespaces[label] = ns
        a, b = namespaces["A"], namespaces["B"]
        a.ip("link", "add", "mig", "type", "veth", "peer", "name", "mig", "netns", b.name)
        for label, ns in namespaces.items():
            ns.ip("addr", "add", f"{MIGRATION[label]}/24", "dev", "mig")
            ns.ip("link", "set", "mig", "up")
        for label, ns in namespaces.items():
            host = LibvirtHost(self.root / f"host{label}", ns, own_cgroups=True, hooks=self.hooks,
                               hook_scripts=self.hook_scripts.get(label))
            self.hosts[label] = PairHost(label, ns, host, MIGRATION[label])
            host.start()
            assert host.virtlogd is not None
            ns.cgroup_ns = f"/proc/{host.virtlogd.pid}/ns/cgroup"
        return self

    @staticmethod
    def _burn_ifindexes(ns: Netns, first: int) -> None:
        """Make the namespace's next ifindex about ``first``: veth pairs (2 each) made, then deleted in one go."""
        pairs = max(0, (first - 2) // 2)
        batch = "".join(f"link add b{i} group 99 type veth peer name c{i}\n" for i in range(pairs))
        batch += "link del group 99\n"  # one request: the kernel unregisters them as a batch
        subprocess.run(["ip", "-n", ns.name, "-batch", "-"], input=batch, text=True, check=True,
                       capture_output=True)

    def close(self) -> list[str]:
        """Both libvirts stopped (their domains destroyed), namespaces gone; what was left behind."""
        problems = []
        for label, host in self.hosts.items():
            problems += [f"host {label}: {line}" for line in host.libvirt.close()]
        self._stack.close()
        return problems

    # -- guests -----------------------------------------------------------------

    def image(self) -> GuestImage:
        if self._image is None:
            self._image = build()
        return self._image

    def domain_xml(self, name: str, address: str, interfaces: list[str], uuid: str | None = None,
                   serve: bool = False, metadata: str = "") -> str:
        """A TCG domain booting the test guest (eth0 = the first interface, ``address`` on it; it pings PEER)."""
        image = self.image()
        guest = self.root / "guest"
        guest.mkdir(mode=0o755, exist_ok=True)
        # Copies: libvirt's DAC driver relabels what the domain boots from.
        kernel, initrd = guest / "vmlinuz", guest / "initrd.cpio"
        if not kernel.exists():
            shutil.copyfile(image.kernel, kernel)
            shutil.copyfile(image.initrd, initrd)
        serial = self.serial_path(name)
        serial.touch()  # the directory is root's: QEMU could not create it
        args = image.qemu_args(serial, [address], ping=PEER, serve=serve)
        cmdline, memory = args[args.index("-append") + 1], args[args.index("-m") + 1]
        # The guest cannot power itself off; with this, ``virsh inject-nmi`` makes
        # it panic and reboot, which QEMU (-no-reboot, from on_reboot destroy)
        # and libvirt take as the guest shutting down.
        cmdline += " unknown_nmi_panic=1"
        nics = "\n    ".join(interfaces)
        return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid or uuid_mod.uuid4()}</uuid>
  {metadata}
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {nics}
    <serial type='file'>
      <source path='{serial}' append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""

    def serial_path(self, name: str) -> Path:
        """The guest's console log: one file, appended to by its QEMU on whichever host it runs."""
        return self.root / "guest" / f"{name}.serial"

    def serial(self, name: str) -> Serial:
        return Serial(self.serial_path(name))

    def define(self, label: str, name: str, xml: str) -> None:
        """Define on ``label``; the other host knows the name too (its QEMUs are found, its leftovers removed)."""
        for host in self.hosts.values():
            host.libvirt.domains.add(name)
        self.hosts[label].libvirt.define(name, xml)

    def make_redirect_tap(self, label: str, tap: str, macvlan: str, mac: str) -> None:
        """On host ``label``: a persistent tap for QEMU joined to a macvlan with the guest's MAC on the lower.

        SPEC 3d's recipe, by ip/tc: ingress u32 match-all + mirred egress
        redirect both ways; IPv6 off before anything is up (else the host
        sends autoconf frames with the guest's MAC); allmulticast on the
        macvlan (else it filters the guest's multicast by its own list).
        """
        ns = self.hosts[label].ns

        def run(*argv: str) -> None:
            subprocess.run(ns.exec_argv(*argv), check=True, capture_output=True)
        run("ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr", "user", "libvirt-qemu")
        run("sysctl", "-q", "-w", f"net.ipv6.conf.{tap}.disable_ipv6=1")
        run("ip", "link", "set", tap, "up")
        run("tc", "qdisc", "add", "dev", tap, "ingress")
        run("ip", "link", "add", "link", LOWER, "name", macvlan, "address", mac, "type", "macvlan", "mode", "bridge")
        run("sysctl", "-q", "-w", f"net.ipv6.conf.{macvlan}.disable_ipv6=1")
        run("tc", "qdisc", "add", "dev", macvlan, "ingress")
        run("tc", "filter", "add", "dev", macvlan, "parent", "ffff:", "prio", "1", "protocol", "all", "u32",
            "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", tap)
        run("tc", "filter", "replace", "dev", tap, "parent", "ffff:", "prio", "1", "handle", "800::800",
            "protocol", "all", "u32", "match", "u8", "0", "0", "action", "mirred", "egress", "redirect",
            "dev", macvlan)
        run("ip", "link", "set", macvlan, "allmulticast", "on", "up")

    # -- migrating --------------------------------------------------------------

    def migrate(self, name: str, src: str, dst: str, *flags: str, timeout: float = 120,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        """``virsh migrate --live`` from host ``src`` to ``dst``, as persistent there and undefined here.

        Extra ``flags`` go to virsh (``--timeout``, ``--bandwidth`` ...). With
        check, a failed migration raises with both hosts' logs.
        """
        source, target = self.hosts[src], self.hosts[dst]
        argv = ["migrate", "--live", "--persistent", "--undefinesource", *flags, name, target.socket_uri,
                "--migrateuri", f"tcp://{target.address}"]
        result = source.libvirt.run_virsh(*argv, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"virsh {' '.join(argv)} failed: {result.stderr.strip()}\n{self.dump(name)}")
        return result

    def migrate_async(self, name: str, src: str, dst: str, *flags: str) -> subprocess.Popen[str]:
        """The same migration, not waited for (to abort it or kill its target mid-way)."""
        source, target = self.hosts[src], self.hosts[dst]
        argv = ["virsh", "-q", "-c", source.libvirt.uri, "migrate", "--live", "--persistent", "--undefinesource",
                *flags, name, target.socket_uri, "--migrateuri", f"tcp://{target.address}"]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def running_on(self, name: str) -> list[str]:
        """The hosts where the domain is running (virsh's word)."""
        return [label for label, host in self.hosts.items() if host.state(name).startswith("running")]

    def check_macvtaps(self, label: str) -> list[str]:
        """Each macvtap in host ``label``'s namespace whose /dev/tapIFINDEX is another device's (one line each)."""
        host = self.hosts[label]
        script = ("import os\n"
                  "for name in os.listdir('/sys/class/net'):\n"
                  "    base = f'/sys/class/net/{name}/macvtap'\n"
                  "    if os.path.isdir(base):\n"
                  "        for tap in os.listdir(base):\n"
                  "            dev = open(f'{base}/{tap}/dev').read().strip()\n"
                  "            try:\n"
                  "                st = os.stat(f'/dev/{tap}')\n"
                  "                node = f'{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}'\n"
                  "            except OSError as exc:\n"
                  "                node = exc.strerror\n"
                  "            if node != dev:\n"
                  "                print(f'{name}: /dev/{tap} is {node}, the device is {dev}')\n")
        result = subprocess.run(host.ns.exec_argv("python3", "-c", script), capture_output=True, text=True,
                                check=True)
        return result.stdout.splitlines()

    def wait_pings(self, name: str, count: int, timeout: float = 60) -> None:
        """Until the guest has printed ``count`` answered pings since its serial's mark."""
        serial = self.serial(name)
        wait_until(lambda: serial.count("GUEST-PING ok") >= count, timeout,
                   f"{name} to have {count} pings answered", lambda: self.dump(name))

    def dump(self, name: str | None = None) -> str:
        parts = []
        if name is not None and self.serial_path(name).exists():
            parts += [f"== {name} serial (tail)", *self.serial(name).lines()[-10:]]
        for label, host in self.hosts.items():
            parts += [f"==== host {label}", host.libvirt.dump(name)]
        return "\n".join(parts)


# Run in the switch's namespace: a new TCP connection to the guest's echo port
# every INTERVAL s, each given TIMEOUT s to connect (a SYN lost while the path
# is not there is followed by the next attempt, not by TCP's 1 s retransmit);
# prints time.monotonic() of each answered echo.
PROBER = """
import errno, selectors, socket, sys, time
address, port, interval, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
selector, pending, next_attempt = selectors.DefaultSelector(), {}, time.monotonic()
while True:
    now = time.monotonic()
    if now >= next_attempt:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if sock.connect_ex((address, port)) in (0, errno.EINPROGRESS):
            pending[sock] = now
            selector.register(sock, selectors.EVENT_WRITE)
        else:
            sock.close()
        next_attempt = now + interval
    for sock, began in list(pending.items()):
        if now - began > timeout:
            selector.unregister(sock); sock.close(); del pending[sock]
    for key, _ in selector.select(max(0.0, next_attempt - time.monotonic())):
        sock = key.fileobj
        del pending[sock]
        selector.unregister(sock)
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                sock.setblocking(True); sock.settimeout(1.0); sock.sendall(b"x")
                if sock.recv(1) == b"x":
                    print(f"{time.monotonic():.6f}", flush=True)
        except OSError:
            pass
        finally:
            sock.close()
"""


class EchoProbe:
    """From the switch: TCP echo attempts to a guest (``serve=True``) every ``interval`` s; when each was answered."""

    def __init__(self, pair: LibvirtPair, address: str, interval: float = 0.02, timeout: float = 0.1) -> None:
        assert pair.switch is not None
        self.out = pair.root / f"probe-{address}-{uuid_mod.uuid4().hex[:6]}.txt"
        argv = [sys.executable, "-c", PROBER, address, str(ECHO_PORT), str(interval), str(timeout)]
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen(pair.switch.exec_argv(*argv), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def answers(self) -> list[float]:
        """The moments (time.monotonic()) of the answers so far."""
        return [float(line) for line in self.out.read_text().split() if line.replace(".", "", 1).isdigit()]

    def stop(self) -> list[float]:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: ip netns exec and the prober
            self.proc.wait(10)
        return self.answers()


def longest_silence(answers: list[float], start: float, end: float) -> float:
    """Seconds of the longest stretch of [start, end] without an answer."""
    inside = [t for t in answers if start <= t <= end]
    before = [t for t in answers if t < start]
    points = [before[-1] if before else start, *inside, end]
    return max(b - a for a, b in itertools.pairwise(points))
