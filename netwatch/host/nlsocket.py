"""netwatch's own rtnetlink socket: requests it encodes itself, answers matched by sequence number.

What a reattach sends (netwatch/host/rtnl.py's links, tc.py's qdiscs and
filters) is short and frequent, so it goes out on a socket of netwatch's
own rather than through pyroute2's request chain. This module owns that
socket and nothing else: several requests leave in one datagram (the kernel
runs them in order), every answer (ack, error, dump part) finds its request
by sequence number, and what a request is for is its caller's business
(netwatch/host/linkops.py, ingress.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from netwatch.errors import LinkError
from netwatch.host import rtnl

SOL_NETLINK = 270
NETLINK_EXT_ACK = 11  # the kernel says why a request failed, not just the errno
ACK_TIMEOUT = 10.0
ACK_BUFFER = 4 * 1024 * 1024
SO_RCVBUFFORCE = 33


@dataclass
class _Pending:
    """A request sent on the socket: what the kernel answered so far, and its outcome."""

    outcome: asyncio.Future[list[bytes]]
    replies: list[bytes] = field(default_factory=list)


class NetlinkSocket:
    """A NETLINK_ROUTE socket read by the event loop; :meth:`open` it in the loop, :meth:`close` it after."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, _Pending] = {}  # sequence number -> its request
        # The kernel runs one dump per socket at a time (EBUSY for a second until the first's end is read).
        self._dumping = asyncio.Lock()
        self._seq = itertools.count(1)

    def open(self) -> None:
        """Open and bind the socket, and have the running loop read it; LinkError if it cannot be."""
        try:
            self._sock = socket.socket(socket.AF_NETLINK,
                                       socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                       socket.NETLINK_ROUTE)
            with contextlib.suppress(OSError):  # an old kernel: errors come without the kernel's sentence
                self._sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            # Room for the acks of every NIC reattaching at once while the loop is busy elsewhere
            # (an ack's skb takes ~800 bytes of the buffer: the default holds ~260).
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, ACK_BUFFER)
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, ACK_BUFFER)
            self._sock.bind((0, 0))
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._sock.fileno(), self._readable)
        except OSError as exc:
            self.close()
            raise LinkError(f"cannot open a netlink socket: {exc.strerror or exc}", exc.errno) from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the socket; whoever still waits for an answer is told netwatch is stopping."""
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self._fail_pending(LinkError("netwatch is stopping"))

    async def exchange(self, *requests: Callable[[int], bytes]) -> list[LinkError | None]:
        """Send requests (each built for its sequence number) in one datagram; each one's outcome.

        The kernel runs them in order, a refused one not stopping the next.
        """
        return [result if isinstance(result, LinkError) else None for result in await self.transact(*requests)]

    async def dump(self, request: Callable[[int], bytes]) -> list[bytes] | LinkError:
        """What the kernel sent back for a dump request, or why it refused: one dump at a time on the socket."""
        async with self._dumping:
            answer, = await self.transact(request)
        return answer

    async def transact(self, *requests: Callable[[int], bytes]) -> list[list[bytes] | LinkError]:
        """As :meth:`exchange`, with what the kernel sent back for each: its replies (a get's; none for a
        change) or why it refused. A dump goes through :meth:`dump`."""
        assert self._sock is not None and self._loop is not None, "NetlinkSocket used before open()"
        seqs = [next(self._seq) % 0xFFFFFFFF + 1 for _ in requests]
        outcomes: list[asyncio.Future[list[bytes]]] = []
        for seq in seqs:
            outcomes.append(self._loop.create_future())
            self._pending[seq] = _Pending(outcomes[-1])
        try:
            self._sock.send(b"".join(request(seq) for request, seq in zip(requests, seqs, strict=True)))
            async with asyncio.timeout(ACK_TIMEOUT):
                results = await asyncio.gather(*outcomes, return_exceptions=True)
        except OSError as exc:
            raise LinkError(exc.strerror or str(exc), exc.errno) from exc
        except TimeoutError as exc:
            raise LinkError(f"the kernel did not answer within {ACK_TIMEOUT:g} s", errno.ETIMEDOUT) from exc
        finally:
            for seq in seqs:
                self._pending.pop(seq, None)
        answers: list[list[bytes] | LinkError] = []
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, LinkError):
                raise result
            answers.append(result)
        return answers

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                # Answers were lost (ENOBUFS): whoever waits is told, and retries.
                self._fail_pending(LinkError(f"netlink: {exc.strerror or exc}", exc.errno))
                return
            for answer in rtnl.answers(data):
                pending = self._pending.get(answer.seq)
                if pending is None:
                    continue
                if answer.data is not None:
                    pending.replies.append(answer.data)
                if not answer.final:
                    continue
                del self._pending[answer.seq]
                if pending.outcome.done():
                    continue
                if answer.error:
                    pending.outcome.set_exception(LinkError(answer.message or os.strerror(answer.error),
                                                            answer.error))
                else:
                    pending.outcome.set_result(pending.replies)

    def _fail_pending(self, error: LinkError) -> None:
        pending, self._pending = self._pending, {}
        for request in pending.values():
            if not request.outcome.done():
                request.outcome.set_exception(error)
