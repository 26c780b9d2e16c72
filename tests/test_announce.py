"""The announce gate: one announce-self per VM once the host's reattaches have quieted (netwatch/qemu/announce.py)."""

from __future__ import annotations

import asyncio

from netwatch.qemu.announce import AnnounceGate


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
