"""The announce gate: one announce-self per VM once the host's reattaches have quieted (netwatch/qemu/announce.py)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from tenacity import wait_fixed

from netwatch.qemu.announce import AnnounceGate
from netwatch.qemu.qmp import VmSession
from netwatch.sandbox.testbed import until

from .test_qmp_session import fake_qemu


def test_a_burst_becomes_one_announcement_per_vm_after_it() -> None:
    async def main() -> list[tuple[str, list[str]]]:
        calls: list[tuple[str, list[str]]] = []

        def vm(name: str):  # type: ignore[no-untyped-def]
            async def announce(nics: list[str]) -> None:
                calls.append((name, nics))
            return announce
        a, b = vm("a"), vm("b")
        gate = AnnounceGate(quiet=0.05, longest=5)
        for nic in ("net0", "net1", "net2"):
            gate.request(a, nic)
            gate.request(b, nic)
            await asyncio.sleep(0.01)  # a burst: never quiet for 0.05 s
            assert calls == [], "nothing is announced while reattaches go on"
        await asyncio.sleep(0.2)
        await gate.close()
        return calls
    calls = asyncio.run(main())
    assert sorted(calls) == [("a", ["net0", "net1", "net2"]), ("b", ["net0", "net1", "net2"])]


def test_a_burst_that_never_quiets_is_announced_after_the_longest_wait() -> None:
    async def main() -> int:
        sent: list[list[str]] = []

        async def announce(nics: list[str]) -> None:
            sent.append(nics)
        gate = AnnounceGate(quiet=0.05, longest=0.2)
        for i in range(40):  # 0.4 s of requests 0.01 s apart
            gate.request(announce, f"net{i}")
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        await gate.close()
        return len(sent)
    assert asyncio.run(main()) >= 2, "the first batch went out before the burst ended"


def test_a_vm_whose_announce_hangs_delays_no_other_vms() -> None:
    """Found in review: requests made while one QEMU's announce-self went unanswered waited for the next reattach."""
    async def main() -> None:
        b_announced = asyncio.Event()
        a_asked = asyncio.Event()

        async def a(nics: list[str]) -> None:
            a_asked.set()
            await asyncio.Event().wait()  # its QEMU never answers

        async def b(nics: list[str]) -> None:
            b_announced.set()
        gate = AnnounceGate(quiet=0.05, longest=1)
        try:
            gate.request(a, "net0")
            async with asyncio.timeout(5):
                await a_asked.wait()
            gate.request(b, "net0")
            async with asyncio.timeout(5):  # before the fix: never (b's request was stranded)
                await b_announced.wait()
        finally:
            await gate.close()
    asyncio.run(main())


def test_a_vm_whose_announce_hangs_gets_its_next_nics_announced_after() -> None:
    """One announce-self at a time per VM: NICs requested meanwhile go in the next, none is lost."""
    async def main() -> list[list[str]]:
        sent: list[list[str]] = []
        release = asyncio.Event()

        async def a(nics: list[str]) -> None:
            sent.append(nics)
            await release.wait()
        gate = AnnounceGate(quiet=0.01, longest=1)
        try:
            gate.request(a, "net0")
            await until(lambda: len(sent) == 1, "the first announce-self")
            gate.request(a, "net1")
            gate.request(a, "net2")
            await asyncio.sleep(0.1)  # quiet and handed over: queued behind the one under way
            assert len(sent) == 1
            release.set()
            await until(lambda: len(sent) == 2, "the queued NICs announced")
        finally:
            await gate.close()
        return sent
    assert asyncio.run(main()) == [["net0"], ["net1", "net2"]]


def test_a_qemu_that_never_answers_announce_self_delays_no_other_vm(tmp_path: Path) -> None:
    """Two VMs' sessions to fake QEMUs sharing the host's gate; a's QEMU never answers announce-self."""
    stuck_timeout = 5.0  # a's qmp_timeout: when its announce-self would give up

    async def main() -> None:
        a_asked_at: list[float] = []
        b_got = asyncio.Event()

        async def never_announces(msg: dict[str, object], writer: asyncio.StreamWriter) -> None:
            if msg["execute"] == "announce-self":
                a_asked_at.append(time.monotonic())
                return  # no answer
            writer.write(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\n")

        async def announces(msg: dict[str, object], writer: asyncio.StreamWriter) -> None:
            if msg["execute"] == "announce-self":
                b_got.set()
            writer.write(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\n")
        paths = str(tmp_path / "a.qmp"), str(tmp_path / "b.qmp")
        servers = [await fake_qemu(paths[0], never_announces), await fake_qemu(paths[1], announces)]
        gate = AnnounceGate()
        try:
            async with VmSession("a", paths[0], lambda: None, timeout=stuck_timeout, connect_wait=wait_fixed(0.05),
                                 announce_gate=gate) as vm_a, \
                    VmSession("b", paths[1], lambda: None, timeout=stuck_timeout, connect_wait=wait_fixed(0.05),
                              announce_gate=gate) as vm_b:
                await until(lambda: vm_a.connected and vm_b.connected, "both sessions")
                vm_a.announce("net0")
                await until(lambda: bool(a_asked_at), "a's announce-self sent")
                vm_b.announce("net0")
                # Before the fix b's request waited for a's to time out, and then for
                # the next request anywhere: it never came.
                async with asyncio.timeout(a_asked_at[0] + stuck_timeout - time.monotonic()):
                    await b_got.wait()
        finally:
            await gate.close()
            for server in servers:
                server.close()
    asyncio.run(main())
