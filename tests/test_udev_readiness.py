"""With udevd, a new link is used only once udevd is done with it (issue 24).

On a Debian 12 host VM (tests/test_hotswap.py, a real udevd) whose two NICs
came back together on a driver reload, udevd's database entry for the
second NIC was there 36-89 ms before udevd renamed it from eth1; netwatch,
which took the entry as the sign, made a MAC-matched NIC's macvtap on eth1
in 2 of 8 rounds. The sign now is udevd's own event, sent after the rename,
naming the link as it is then. These are the rules, with a database
directory of the test's own; the real udevd runs in test_hotswap.py.
"""

from __future__ import annotations

from pathlib import Path

from netwatch.host.udev import UdevReadiness, udev_initialized


def entry(data: Path, index: int, text: str = "I:1234\nE:ID_NET_NAME_PATH=enp0s5\n") -> None:
    (data / f"n{index}").write_text(text)


def test_a_new_link_waits_for_udevds_event_even_with_a_database_entry(tmp_path: Path) -> None:
    ready = UdevReadiness(str(tmp_path))
    ready.prime([1, 2])  # the links there at start
    entry(tmp_path, 7)  # udevd wrote the entry before renaming eth1 (seen on systemd 252)
    assert not ready(7, "eth1")
    ready.on_event("add", "ens5", 7)  # udevd done: renamed
    assert not ready(7, "eth1"), "the table has not read the rename yet: the link is not used under its old name"
    assert ready(7, "ens5")
    assert ready(7, "renamed-later"), "once used, an admin's rename does not make the lower vanish"


def test_links_there_before_netwatch_listened_go_by_their_database_entry(tmp_path: Path) -> None:
    ready = UdevReadiness(str(tmp_path))
    entry(tmp_path, 3)
    entry(tmp_path, 4, "I:1\nE:ID_PROCESSING=1\n")  # udevd is still at it (newer udevd marks the entry)
    ready.prime([3, 4, 5])  # 5: no entry yet
    assert ready(3, "ens4")
    assert not ready(4, "ens5")
    assert not ready(5, "ens6")
    ready.on_event("move", "ens5", 4)
    assert ready(4, "ens5")


def test_a_removed_link_forgets_and_a_name_udev_could_not_decode_matches_any(tmp_path: Path) -> None:
    ready = UdevReadiness(str(tmp_path))
    ready.on_event("add", "ens5", 9)
    assert ready(9, "ens5")
    ready.on_event("remove", "ens5", 9)
    entry(tmp_path, 9)
    assert not ready(9, "ens5"), "an ifindex seen again is a new link: its own event decides"
    ready.on_event("add", "", 10)  # pyudev could not decode the name (not UTF-8): the ifindex alone
    assert ready(10, "m\udcff0")
    ready.on_event("add", "x", None)  # no ifindex: nothing


def test_udev_initialized_reads_the_entry(tmp_path: Path) -> None:
    assert not udev_initialized(1, str(tmp_path))
    entry(tmp_path, 1)
    assert udev_initialized(1, str(tmp_path))
    (tmp_path / "n2").mkdir()  # not a file: not an entry
    assert not udev_initialized(2, str(tmp_path))
