"""The two-host libvirt environment itself (tests/libvirt_pair.py), without netwatch.

A domain booting the test guest with libvirt's own ``type='direct'`` NIC is
live-migrated from host A to host B with ``virsh migrate --live``; the guest
must answer its peer's pings on B, and each host's qemu hook must have seen
its side of it (the target's migrate/prepare/start/started, the source's
stopped/release with the status file saying "migration out").
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from netwatch.sandbox.guest import GuestError

from .libvirt_host import running
from .libvirt_pair import LibvirtPair, direct_nic

pytestmark = pytest.mark.integration

NAME = "nwpair"
MAC = "52:54:00:79:00:02"


@pytest.fixture
def pair(short_tmp: Path) -> Iterator[LibvirtPair]:
    pair = LibvirtPair(short_tmp)
    with running(pair, "test_libvirt_pair_env"):
        yield pair


def test_a_direct_nic_domain_migrates_live_from_a_to_b_and_answers_there(pair: LibvirtPair) -> None:
    try:
        xml = pair.domain_xml(NAME, "10.79.1.2/24", [direct_nic(MAC)])
    except GuestError as exc:
        pytest.fail(f"the test guest cannot be built: {exc}", pytrace=False)
    pair.define("A", NAME, xml)
    pair["A"].virsh("start", NAME)
    serial = pair.serial(NAME)
    pair.wait_pings(NAME, 3, timeout=90)
    assert pair.check_macvtaps("A") == [], "libvirt opened another namespace's /dev/tapN"

    serial.set_mark()
    pair.migrate(NAME, "A", "B")
    assert pair.running_on(NAME) == ["B"], pair.dump(NAME)
    assert pair["A"].state(NAME) == "absent", "--undefinesource: A no longer knows the domain"
    assert pair.check_macvtaps("B") == []
    pair.wait_pings(NAME, 3, timeout=30)
    print(f"\nA -> B: the guest's pings since the migration began: {serial.count('GUEST-PING ok')} answered, "
          f"{serial.count('GUEST-PING fail')} lost")
    [qemu_b] = pair["B"].libvirt.qemu_pids()
    assert pair["A"].libvirt.qemu_pids() == [], "the source's QEMU is gone"
    # Run in B (its netns and cgroup namespace), the QEMU's cgroup reads as on a real host.
    seen = subprocess.run(pair["B"].ns.exec_argv("cat", f"/proc/{qemu_b}/cgroup"), capture_output=True, text=True,
                          check=True).stdout
    assert f"0::/machine/qemu-1-{NAME}.libvirt-qemu/" in seen, seen

    target = [r.op for r in pair["B"].hook_records(NAME)]
    assert target == ["migrate begin", "prepare begin", "start begin", "started begin"], target
    started = pair["B"].hook_records(NAME)[-1]
    assert started.pid_file is not None and int(started.pid_file) == qemu_b, started.pid_file
    source = pair["A"].hook_records(NAME)
    assert [r.op for r in source] == ["prepare begin", "start begin", "started begin", "stopped end",
                                      "release end"], [r.op for r in source]
    stopped = source[3]
    assert stopped.status_xml is not None and re.search(r"<job [^>]*async='migration out'", stopped.status_xml), \
        stopped.status_xml
