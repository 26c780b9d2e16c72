"""QMP socket watches: one inotify instance for all VMs, each VM woken by its own socket only."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from netwatch.qemu.sockwatch import SocketWatch
from netwatch.sandbox.testbed import until


def inotify_fds() -> int:
    """This process's inotify instances (what fs.inotify.max_user_instances counts)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                count += 1
        except OSError:
            continue  # the listing's own fd, closed meanwhile
    return count


def test_all_watches_share_one_inotify_instance_and_wake_only_their_own(tmp_path: Path) -> None:
    """Issue 21 item 11: 128 VMs took 128 inotify instances (root's whole fs.inotify.max_user_instances)."""
    dirs = [tmp_path / f"d{i}" for i in range(6)]
    for directory in dirs:
        directory.mkdir()
    # Two VMs in one directory as well: libvirt puts every VM's socket in one.
    paths = [directory / "vm.qmp" for directory in dirs] + [dirs[0] / "other.qmp"]

    async def main() -> None:
        before = inotify_fds()
        watches = [SocketWatch(str(path)) for path in paths]
        for watch in watches:
            watch.start()
        servers: list[socket.socket] = []
        try:
            assert inotify_fds() - before == 1, f"{inotify_fds() - before} inotify instances for {len(watches)} VMs"
            sleepers = [asyncio.create_task(watch.sleep(60)) for watch in watches]
            for index, path in enumerate(paths):
                # Another name in the same directory wakes nobody.
                (path.parent / f"unrelated{index}").touch()
                server = socket.socket(socket.AF_UNIX)
                servers.append(server)
                server.bind(str(path))
                await until(sleepers[index].done, f"the watch of {path} to wake", timeout=10)
                # Events are dispatched in one pass: a wrong wake-up would be set by now.
                woken = [i for i, sleeper in enumerate(sleepers) if sleeper.done()]
                assert woken == list(range(index + 1)), (path, woken)
            # One VM gone: the others, in its directory too, still wake.
            watches[0].close()
            assert inotify_fds() - before == 1
            watches[-1].appeared.clear()
            servers[-1].close()
            os.unlink(paths[-1])
            again = socket.socket(socket.AF_UNIX)
            servers.append(again)
            again.bind(str(paths[-1]))
            await until(watches[-1].appeared.is_set, "the other VM in the first directory to wake", timeout=10)
        finally:
            for server in servers:
                server.close()
            for watch in watches:
                watch.close()
        assert inotify_fds() == before, "the instance is closed with its last watch"

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_missing_directory_takes_no_instance(tmp_path: Path) -> None:
    async def main() -> None:
        before = inotify_fds()
        watch = SocketWatch(str(tmp_path / "missing" / "vm.qmp"))
        watch.start()
        try:
            assert inotify_fds() == before
            await watch.sleep(0.01)  # the delay alone applies
        finally:
            watch.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_touching_a_socket_wakes_nobody(tmp_path: Path) -> None:
    """Issue 21 item 9: a socket's attributes changing (touch, chmod) ended a VM's connect backoff at once."""
    path = tmp_path / "vm.qmp"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))

    async def main() -> None:
        watch = SocketWatch(str(path))
        watch.start()
        try:
            sleeper = asyncio.create_task(watch.sleep(60))
            await asyncio.sleep(0)
            for _ in range(3):
                os.utime(path)
                os.chmod(path, 0o600)
            # A new name in the directory is an event the watch reads: it is read after the touches.
            marker = tmp_path / "marker.qmp"
            marker_watch = SocketWatch(str(marker))
            marker_watch.start()
            marker_sleeper = asyncio.create_task(marker_watch.sleep(60))
            await asyncio.sleep(0)
            marker.touch()
            await until(marker_sleeper.done, "the marker's watch to wake", timeout=10)
            assert not sleeper.done(), "touching the socket ended the sleep"
            sleeper.cancel()
            marker_watch.close()
        finally:
            watch.close()

    try:
        asyncio.run(main())
    finally:
        server.close()
