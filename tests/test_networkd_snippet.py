"""Issue 21 item 13, the host's network manager: conf/systemd-network/00-netwatch.network.

A host whose systemd-networkd has a catch-all .network (``Type=ether``:
cloud images and hand-written configs have one) would manage netwatch's
backends like any NIC: IPv4 link-local probes, DHCP and router solicitations
with the guest's MAC, whatever netwatch set on the link. Here the real
systemd-networkd runs in the test's namespace (its config and state
directories bind-mounted over in a private mount namespace; /sys read-only,
so it does not wait for a udev that cannot see the namespace) with such a
catch-all and the shipped snippet: the backend stays unmanaged, with no
address, and sends only the guest's frames.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from netwatch.sandbox.testbed import wait_until

from .test_silent_backends import MAC, Sniffer, addresses, describe, guest_frames, ipv6_on, stats
from .world import World

pytestmark = pytest.mark.integration

NETWORKD = next((p for p in ("/lib/systemd/systemd-networkd", "/usr/lib/systemd/systemd-networkd")
                 if os.path.exists(p)), None)
SNIPPET = Path(__file__).resolve().parent.parent / "conf" / "systemd-network" / "00-netwatch.network"
CATCH_ALL = "[Match]\nType=ether\n\n[Network]\nDHCP=ipv4\nLinkLocalAddressing=yes\nIPv6AcceptRA=yes\n"


def start_networkd(world: World) -> subprocess.Popen[bytes]:
    """systemd-networkd in the world's namespace, with its own config (the snippet, a catch-all) and state."""
    root = world.tmp / "networkd"
    for sub in ("etc", "run", "lib", "netif"):
        (root / sub).mkdir(parents=True)
    shutil.copy(SNIPPET, root / "etc" / SNIPPET.name)
    (root / "etc" / "99-host.network").write_text(CATCH_ALL)
    shutil.chown(root / "netif", "systemd-network", "systemd-network")
    script = (f"set -e; mount --make-rprivate /; mount --bind {root}/etc /etc/systemd/network; "
              f"mount --bind {root}/lib /usr/lib/systemd/network; mkdir -p /run/systemd/network /run/systemd/netif; "
              f"mount --bind {root}/run /run/systemd/network; mount --bind {root}/netif /run/systemd/netif; "
              f"exec ip netns exec {world.ns.name} sh -c 'mount -o remount,ro /sys && "
              f"exec env SYSTEMD_LOG_LEVEL=debug {NETWORKD}'")
    with open(root / "log", "ab") as log:
        # unshare, sh and ip exec in turn: the pid is networkd's.
        return subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)


def admin_state(world: World, link: str) -> str | None:
    """networkd's word on a link (its state file), if it has written one."""
    try:
        index = int(world.ns.ip("-o", "link", "show", link).split(":")[0])
        text = (world.tmp / "networkd" / "netif" / "links" / str(index)).read_text()
    except (OSError, ValueError, RuntimeError):
        return None
    return next((line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ADMIN_STATE=")), None)


@pytest.mark.skipif(NETWORKD is None or shutil.which("unshare") is None, reason="needs systemd-networkd, unshare")
def test_networkd_with_a_catch_all_leaves_the_backend_alone(world: World) -> None:
    ipv6_on(world.ns)
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC})
    world.lower("lo0", "wi0")
    networkd = start_networkd(world)
    sniffer = Sniffer(world.ns, ("wi0",))
    try:
        log = world.tmp / "networkd" / "log"
        wait_until(lambda: admin_state(world, "lo0") in ("configuring", "configured"), 20,
                   "networkd to manage lo0 (the catch-all)", lambda: log.read_text()[-3000:])
        world.start_qemu("vm1")
        world.start_netwatch()
        nic = world.wait_state("vm1", "net0", "attached", guest_link=True)
        backend = nic["ifname"]
        world.frame_reaches_wire("vm1", "net0", "wi0")
        # A link networkd does manage, made after the backend: once it has
        # its IPv4 link-local address, networkd has had time to do the same
        # to the backend, had it managed it.
        world.ns.ip("link", "add", "link", "lo0", "name", "ctl0", "address", "02:00:00:00:0c:02", "type", "macvtap")
        world.ns.ip("link", "set", "ctl0", "up")
        wait_until(lambda: any(a.startswith("169.254.") for a in addresses(world.ns, "ctl0")), 30,
                   "networkd to give ctl0 an IPv4 link-local address", world.dump)
        stray = [frame for frame in sniffer.sent_by(MAC) if frame not in guest_frames([frame])]
        facts = {"networkd": admin_state(world, backend), "addresses": addresses(world.ns, backend),
                 "stray frames": describe(stray), "tx": stats(world.ns, backend)["tx"]}
        assert facts == {"networkd": "unmanaged", "addresses": [], "stray frames": [],
                         "tx": len(guest_frames(sniffer.sent_by(MAC)))}
    finally:
        sniffer.close()
        networkd.terminate()
        networkd.wait(10)
