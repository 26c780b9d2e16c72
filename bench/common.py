"""Shared by the bench scripts: run the body inside a throwaway namespace; summaries."""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
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
    return (f"{name:<9} p50 {statistics.median(ordered):7.2f} {unit}   p90 {p90:7.2f} {unit}   "
            f"max {ordered[-1]:7.2f} {unit}   (n={len(ordered)})")
