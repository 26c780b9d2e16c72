"""Control clients that hold their slots (never reading, never asking) cannot lock root out of the service."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from netwatch.sandbox.testbed import Deadline, wait_until
from netwatch.service import control

from .world import World

HOSTILE = control.MAX_CLIENTS


def served_world(world: World) -> None:
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": "52:54:00:9e:00:21"})
    world.start_netwatch()
    wait_until(lambda: "vms" in world.status(), 20, "netwatch to answer", world.dump)


def connect(world: World) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(control.socket_path(world.state))
    return sock


def status_answers_at_once(world: World) -> dict[str, Any]:
    """One ``netwatch status --json`` as root runs it: answered the first time, not after retries."""
    done = world.cli("status", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(json.loads(done.stdout))


def pipeline_until_stuck(sock: socket.socket, deadline: float) -> int:
    """Send status requests without reading a single answer until the service stops taking them."""
    sock.setblocking(False)
    batch = b'{"cmd": "status"}\n' * 512
    sent = 0
    while time.monotonic() < deadline:
        try:
            sent += sock.send(batch)
        except BlockingIOError:
            # netwatch reads the next request only once the last answer is out:
            # a full queue here means it is stuck writing to this client.
            return sent
    raise Deadline(f"netwatch kept taking requests from a client that reads nothing ({sent} bytes)")


def hung_up(sock: socket.socket) -> bool:
    """Whether netwatch closed its end (seen without reading what it sent, which would unstick it)."""
    poller = select.poll()
    poller.register(sock, select.POLLHUP)
    return any(events & select.POLLHUP for _fd, events in poller.poll(0))


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    try:
        yield made
    finally:
        for sock in made:
            sock.close()


@pytest.mark.integration
def test_clients_that_never_read_cannot_lock_root_out(world: World, sockets: list[socket.socket]) -> None:
    """Issue 21 item 8: 32 clients pipelining requests without reading kept root's status refused for good."""
    served_world(world)
    assert world.netwatch is not None
    fds = world.netwatch.fd_count()
    deadline = time.monotonic() + 30
    for _ in range(HOSTILE):
        sockets.append(connect(world))
        pipeline_until_stuck(sockets[-1], deadline)
    # Every slot is held by a client netwatch cannot answer; root is still served, again and again.
    for _ in range(3):
        assert [vm["name"] for vm in status_answers_at_once(world)["vms"]] == ["vm1"]
    # An answer nobody reads is given up on: every such client is dropped and its fd closed.
    wait_until(lambda: all(hung_up(sock) for sock in sockets), 30,
               "netwatch to drop the clients that read nothing",
               lambda: f"{sum(hung_up(sock) for sock in sockets)} of {HOSTILE} dropped\n{world.dump()}")
    wait_until(lambda: world.netwatch is not None and world.netwatch.fd_count() <= fds, 10,
               "netwatch's fds back to where they were", world.dump)
    status_answers_at_once(world)


@pytest.mark.integration
def test_idle_clients_give_their_slots_to_root(world: World, sockets: list[socket.socket]) -> None:
    """Clients that connect and never ask held every slot for 10 s at a time (and reconnected)."""
    served_world(world)
    for _ in range(HOSTILE):
        sockets.append(connect(world))
    # A dozen rounds: each newcomer takes the slot of the client idle longest, never root's own.
    for _ in range(12):
        sockets.append(connect(world))
        status_answers_at_once(world)
