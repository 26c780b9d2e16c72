"""``netwatch demo`` as a user runs it: a real guest's pings survive the flaps; nothing is left behind."""

from __future__ import annotations

import glob
import os
import re
import subprocess
from pathlib import Path

import pytest

from .world import run_netwatch

# Each demo run may take up to its own 300 s (the first also builds the test guest).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _residue() -> list[str]:
    namespaces = [line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                             text=True).stdout.splitlines()]
    left = [name for name in namespaces if name.startswith("nwdemo")]
    left += glob.glob("/run/netwatch-demo-*")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"/run/netwatch-demo-" in cmdline:
            left.append(f"process {pid}: " + cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return left


def _run_demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    before = _residue()
    done = run_netwatch("demo", *args, env=env, timeout=300)
    assert _residue() == before, f"left behind: {_residue()}\n{done.stdout}\n{done.stderr}"
    return done


def test_demo_shows_a_guest_pinging_through_flaps() -> None:
    done = _run_demo("--flaps", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(r"guest booted in [0-9.]+ s and pings 10\.77\.0\.1", out), out
    for flap in (1, 2):
        assert f"flap {flap}: demo-lower deleted (guest: carrier 0" in out, out
    assert "pings answered again" in out and "the guest booted once and its eth0 never went away" in out, out
    assert out.rstrip().endswith("sandbox removed"), out


def test_demo_without_a_guest_shows_frames_at_the_hub() -> None:
    done = _run_demo("--no-guest", "--flaps", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "guest -> wire: a frame the guest sent arrived on demo-wire" in done.stdout, done.stdout
    assert "2 flaps: median" in done.stdout, done.stdout


def test_demo_says_why_it_has_no_guest_and_goes_on(tmp_path: Path) -> None:
    """A machine that cannot fetch the Debian packages still gets the frame-level demo."""
    empty = tmp_path / "empty"
    (empty / "partial").mkdir(parents=True)
    apt_conf = tmp_path / "apt.conf"
    apt_conf.write_text(f'Dir::State::lists "{empty}"; Dir::Cache "{empty}"; Dir::Etc::sourcelist "/dev/null"; '
                        f'Dir::Etc::sourceparts "{empty}"; Dir::State::status "/dev/null";\n')
    done = _run_demo("--flaps", "1", env={"APT_CONFIG": str(apt_conf),
                                          "NETWATCH_GUEST_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stdout + done.stderr
    said = [line for line in done.stdout.splitlines() if line.startswith("netwatch: cannot build the guest: ")]
    assert len(said) == 1 and said[0].endswith("showing frames at the guest NIC instead of a booted guest"), \
        done.stdout
    assert "1 flaps: median" in done.stdout, done.stdout
