"""A hostile QMP peer (tests/hostile_peer.py) as a child process whose output goes to a file.

Read from a file, not a pipe: a test waits for a line with a deadline
(netwatch.sandbox.testbed.wait_until) instead of blocking in readline.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from netwatch.sandbox.testbed import wait_until

ROOT = Path(__file__).parent.parent
# The system's Python: another user may not run the venv's (under /root), and the peer needs only the stdlib.
SYSTEM_PYTHON = "/usr/bin/python3"


class PeerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], output: Path) -> None:
        self.proc = proc
        self.output = output

    @property
    def pid(self) -> int:
        return self.proc.pid

    def lines(self) -> list[str]:
        try:
            return self.output.read_text().splitlines()
        except OSError:
            return []

    def count(self, prefix: str) -> int:
        return sum(line.startswith(prefix) for line in self.lines())

    def wait_for(self, prefix: str, timeout: float = 20, at_least: int = 1,
                 dump: Callable[[], str] | None = None) -> None:
        wait_until(lambda: self.count(prefix) >= at_least or self.proc.poll() is not None, timeout,
                   f"the peer to print {prefix!r}",
                   lambda: "\n".join(self.lines()[-20:]) + (f"\n{dump()}" if dump else ""))
        assert self.proc.poll() is None, f"the peer exited ({self.proc.returncode}): {self.lines()[-5:]}"


@contextmanager
def hostile(mode: str, *args: str, output: Path, user: int | None = None) -> Iterator[PeerProcess]:
    """Run ``python -m tests.hostile_peer MODE ARGS...`` (as uid/gid ``user`` if given) until the block ends."""
    with open(output, "wb") as out:
        proc = subprocess.Popen([SYSTEM_PYTHON if user is not None else sys.executable, "-m", "tests.hostile_peer",
                                 mode, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, user=user, group=user,
                                extra_groups=[] if user is not None else None)
    peer = PeerProcess(proc, output)
    try:
        peer.wait_for("listening")
        yield peer
    finally:
        proc.kill()
        proc.wait(10)
