"""Shared by the bench scripts: run the body inside a throwaway namespace; summaries."""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator
from pathlib import Path

from netwatch.sandbox.testbed import Netns

CLEANUP_WAIT = 30.0  # seconds the inner bench gets to clean up after Ctrl-C


def run_in_netns(script: str, args: list[str]) -> int:
    """Re-run ``script`` with ``--inner WORKDIR`` inside a new network namespace."""
    if os.geteuid() != 0:
        print(f"{Path(script).name}: needs root (network namespaces, macvtap)", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="nw-bench-")
    started = time.monotonic()
    try:
        with Netns("nwbench") as ns:
            argv = ns.exec_argv(sys.executable, str(Path(script).resolve()), *args, "--inner", workdir)
            code = _run_to_the_end(argv)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"(bench took {time.monotonic() - started:.0f} s)")
    return code


def _run_to_the_end(argv: list[str]) -> int:
    """Run the inner bench; on SIGTERM or Ctrl-C let it clean up (it gets the signal too) before the namespace goes."""
    proc = subprocess.Popen(argv)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the inner, in the same process group, has its own
        try:
            proc.wait(CLEANUP_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def summary(name: str, values: list[float], unit: str = "ms") -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return (f"{name:<10} p50 {statistics.median(ordered):7.2f} {unit}   p90 {p90:7.2f} {unit}   "
            f"max {ordered[-1]:7.2f} {unit}   (n={len(ordered)})")


def echo_answers(ns: Netns, address: str, port: int, interval: float, connect_timeout: float,
                 echo_timeout: float = 2.0, deadline: float = float("inf"),
                 stopped: Callable[[], bool] = lambda: False) -> Generator[float, None, None]:
    """From ``ns``, a new TCP connection to ``address`` every ``interval`` s; yields when each echo answers.

    Each attempt is given up after ``connect_timeout``: a SYN lost to a path
    not there yet is followed by the next one a few ms later, not by TCP's
    1 s retransmission (so a figure's resolution is ``interval``). Runs until
    the caller stops iterating, until ``deadline`` (monotonic) or until
    ``stopped()``; its sockets are closed then.
    """
    selector = selectors.DefaultSelector()
    pending: dict[socket.socket, float] = {}
    next_attempt = time.monotonic()
    try:
        while (now := time.monotonic()) < deadline and not stopped():
            if now >= next_attempt:
                with ns.entered():
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                if sock.connect_ex((address, port)) in (0, errno.EINPROGRESS):
                    pending[sock] = now
                    selector.register(sock, selectors.EVENT_WRITE, sock)
                else:
                    sock.close()
                next_attempt = now + interval
            for sock, started in list(pending.items()):
                if now - started > connect_timeout:
                    selector.unregister(sock)
                    sock.close()
                    del pending[sock]
            for key, _ in selector.select(max(0.0, next_attempt - time.monotonic())):
                sock = key.data
                del pending[sock]
                selector.unregister(sock)
                with contextlib.closing(sock):
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and echo(sock, echo_timeout):
                        yield time.monotonic()
    finally:
        for sock in pending:
            sock.close()
        selector.close()


def echo(sock: socket.socket, timeout: float) -> bool:
    """One byte there and back on a connected socket."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    try:
        sock.sendall(b"x")
        return sock.recv(1) == b"x"
    except OSError:
        return False
