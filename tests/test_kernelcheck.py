"""Issue 22 item 5: which of the redirect wiring's modules the running kernel
lacks, one sentence each, asked of the kernel in a throwaway namespace."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from netwatch.host import kernelcheck
from netwatch.host.kernelcheck import MODULES, NAMESPACE, KernelSupport, Probe, check_kernel, judge
from netwatch.sandbox.testbed import sh

ALL_MADE = [Probe(NAMESPACE, 0), *(Probe(module, 0) for module in MODULES)]


def answers(**refused: tuple[int, str | None]) -> list[Probe]:
    """Every step made, but those given: (errno, the kernel's sentence)."""
    return [Probe(p.step, *refused[p.step]) if p.step in refused else p for p in ALL_MADE]


def test_what_a_kernel_without_a_module_answers_is_one_sentence_naming_it() -> None:
    """Canned kernel answers: what each module's absence looks like, with and without extended acks."""
    assert judge(ALL_MADE) == KernelSupport()
    assert judge(ALL_MADE).sentences() == []
    no_mirred = judge(answers(act_mirred=(errno.ENOENT, "Failed to load TC action module")))
    assert no_mirred.missing == ("act_mirred",) and not no_mirred.unchecked
    assert no_mirred.sentences() == ["the kernel has no act_mirred (CONFIG_NET_ACT_MIRRED)"]
    # Only for what the caller needs.
    assert no_mirred.sentences(needed=("tun", "macvlan")) == []
    # A u32 filter needs a qdisc: without sch_ingress, cls_u32 is not tried and cannot be told.
    several = judge([p for p in answers(sch_ingress=(errno.ENOENT, "Specified qdisc kind is unknown"),
                                        macvlan=(errno.EOPNOTSUPP, "Unknown device type"),
                                        act_mirred=(errno.ENOENT, None))  # a kernel without extended acks
                     if p.step != "cls_u32"])
    assert several.sentences() == [
        "the kernel has no macvlan (CONFIG_MACVLAN)",
        "the kernel has no sch_ingress (CONFIG_NET_SCH_INGRESS)",
        "the kernel has no act_mirred (CONFIG_NET_ACT_MIRRED)",
        "could not check whether the kernel has cls_u32: cls_u32: it needs sch_ingress",
    ]
    no_u32 = judge(answers(cls_u32=(errno.ENOENT, "TC classifier not found")))
    assert no_u32.sentences() == ["the kernel has no cls_u32 (CONFIG_NET_CLS_U32)"]
    no_tun = judge([p for p in answers(tun=(errno.ENODEV, None)) if p.step != "macvlan"])
    assert no_tun.sentences() == ["the kernel has no tun (CONFIG_TUN)",
                                  "could not check whether the kernel has macvlan: macvlan: it needs tun"]


def test_other_refusals_leave_a_module_unknown_in_the_kernels_words() -> None:
    # ENOENT for another reason than a missing module is not taken for one.
    odd = judge(answers(cls_u32=(errno.ENOENT, "Some other reason"), act_mirred=(errno.EPERM, None)))
    assert odd.missing == () and odd.unchecked == ("cls_u32", "act_mirred")
    assert odd.sentences() == ["could not check whether the kernel has cls_u32, act_mirred: cls_u32: the kernel said "
                               "Some other reason (No such file or directory); act_mirred: the kernel said "
                               "Operation not permitted"]
    no_namespace = judge([Probe(NAMESPACE, errno.EPERM)])
    assert no_namespace.unchecked == tuple(MODULES) and no_namespace.missing == ()
    assert no_namespace.sentences(needed=("act_mirred",)) == [
        "could not check whether the kernel has act_mirred: no network namespace to test in: "
        "Operation not permitted"]
    stopped = judge(ALL_MADE[:3], finished=False)
    assert stopped.unchecked == ("sch_ingress", "cls_u32", "act_mirred")
    assert stopped.why_unchecked == "sch_ingress, cls_u32, act_mirred: the check was stopped before it was tried"
    failed = judge([*ALL_MADE[:2], Probe(kernelcheck.FAILED, 0, "OSError: boom")])
    assert "the check failed: OSError: boom" in failed.why_unchecked
    assert judge([], finished=False).why_unchecked == "the check was stopped before it began"


def _links() -> set[str]:
    return set(sh("ip", "-o", "link", "show").split("\n"))


def _children() -> set[int]:
    found: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as handle:
            found |= {int(pid) for pid in handle.read().split()}
    return found


@pytest.fixture
def forks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The pids of the children check_kernel forks (a real fork, only watched)."""
    made: list[int] = []
    real_fork = os.fork

    def fork() -> int:
        pid = real_fork()
        if pid:
            made.append(pid)
        return pid
    monkeypatch.setattr(kernelcheck.os, "fork", fork)
    yield made


@pytest.mark.integration
def test_this_kernel_has_everything_and_the_check_changes_nothing_on_the_host(forks: list[int]) -> None:
    before = _links()
    lo_qdiscs = sh("tc", "qdisc", "show", "dev", "lo")
    support = asyncio.run(check_kernel())
    assert support == KernelSupport(), support
    # Its tap, macvlan, qdisc and filters were made in the child's namespace and went with it.
    assert not [line for line in _links() - before if "nwk" in line]
    assert sh("tc", "qdisc", "show", "dev", "lo") == lo_qdiscs
    assert forks and not set(forks) & _children()  # reaped


@pytest.mark.integration
def test_a_check_that_takes_too_long_is_killed_and_says_so(forks: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    def stuck(libc: object) -> Iterator[tuple[str, int, str | None]]:
        # In the forked child: a check that hangs before its first answer. (A timeout of 0 s alone raced the
        # child, which sometimes answered for three modules before it was killed.)
        time.sleep(60)
        yield from ()
    monkeypatch.setattr(kernelcheck, "_probe", stuck)
    support = asyncio.run(check_kernel(timeout=0.5))
    assert support.missing == () and support.unchecked == tuple(MODULES), support
    assert "stopped" in support.why_unchecked
    assert forks and not set(forks) & _children()  # killed and reaped, not left a zombie


def _run_as(prefix: list[str]) -> str:
    code = "import asyncio; from netwatch.host.kernelcheck import check_kernel; print(asyncio.run(check_kernel()))"
    result = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.integration
def test_not_root_is_unknown_not_a_failure() -> None:
    assert _run_as(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]) == repr(KernelSupport(
        unchecked=tuple(MODULES), why_unchecked="netwatch is not running as root"))


@pytest.mark.integration
def test_without_cap_sys_admin_a_user_namespace_does_it() -> None:
    """A service's bounding set has no CAP_SYS_ADMIN: unshare(CLONE_NEWNET) alone is refused."""
    assert _run_as(["setpriv", "--bounding-set", "-sys_admin"]) == repr(KernelSupport())
