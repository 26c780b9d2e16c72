"""Log entries held while they come in a burst: order, times, bounds, and nothing lost."""

from __future__ import annotations

import asyncio
import logging
import time

from netwatch.logbuffer import BurstBuffer
from netwatch.sandbox.testbed import until


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.flushes = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def flush(self) -> None:
        self.flushes += 1


def _logger(handler: logging.Handler) -> logging.Logger:
    log = logging.getLogger(f"test-logbuffer-{id(handler)}")
    log.propagate = False
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    return log


def test_outside_an_event_loop_entries_go_out_at_once() -> None:
    target = Collect()
    log = _logger(BurstBuffer(target))
    log.info("one %s", "entry")
    assert target.lines == ["one entry"]


def test_a_burst_is_held_then_written_whole_in_order_with_its_own_times() -> None:
    target = Collect()
    buffer = BurstBuffer(target, quiet=0.01, longest=5.0)
    log = _logger(buffer)
    seen: list[float] = []

    async def main() -> None:
        facts = ["before"]
        for n in range(300):  # no await in between: one burst
            log.info("entry %d of %s", n, facts)
        facts.append("after")  # the message was fixed when it was made
        assert target.lines == []
        await until(lambda: len(target.lines) == 300, "the burst written")
        assert target.lines == [f"entry {n} of ['before']" for n in range(300)]

    original = target.emit
    target.emit = lambda record: (seen.append(record.created), original(record))  # type: ignore[method-assign]
    asyncio.run(main())
    assert seen == sorted(seen) and seen[-1] - seen[0] < 1.0


def test_entries_that_keep_coming_are_written_after_longest() -> None:
    target = Collect()
    log = _logger(BurstBuffer(target, quiet=60.0, longest=0.05))

    async def main() -> None:
        n = 0
        async with asyncio.timeout(10):
            while not target.lines:  # a burst that never quiets down
                log.info("entry %d", n)
                n += 1
                await asyncio.sleep(0.001)
        assert target.lines == [f"entry {i}" for i in range(len(target.lines))]

    asyncio.run(main())


def test_flush_and_the_limit_write_everything_held() -> None:
    target = Collect()
    buffer = BurstBuffer(target, quiet=60.0, longest=60.0, limit=10)
    log = _logger(buffer)

    async def main() -> None:
        for n in range(25):
            log.info("entry %d", n)
        assert target.lines == [f"entry {n}" for n in range(20)]  # two batches of the limit
        buffer.flush()
        assert target.lines == [f"entry {n}" for n in range(25)]
        log.info("last")
        buffer.close()  # as logging's shutdown does at exit
        assert target.lines[-1] == "last"

    asyncio.run(main())


def test_event_entries_held_as_parts_keep_fields_time_and_order() -> None:
    """events.emit's entries are held unmade and written as the records they would have been."""
    from netwatch import events

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    buffer = BurstBuffer(Keep(), quiet=0.01, longest=5.0)
    root = logging.getLogger()
    saved = root.handlers[:], root.level, events._buffer
    root.handlers[:], events._buffer = [buffer], buffer
    root.setLevel(logging.INFO)
    try:
        async def main() -> float:
            made = time.time()
            events.emit("attached", "first", vm="v", nic="n", lower="eth1", netdev="nw-n-tap1")
            logging.getLogger("netwatch.other").warning("second %s", "plain")
            events.emit("lower-lost", "third", vm="v", nic="n")
            assert records == []
            await until(lambda: len(records) == 3, "three entries written")
            return made

        made = asyncio.run(main())
    finally:
        root.handlers[:], events._buffer = saved[0], saved[2]
        root.setLevel(saved[1])
    assert [r.getMessage() for r in records] == ["first", "second plain", "third"]
    first = records[0]
    assert (first.nw_event, first.nw_vm, first.nw_nic, first.nw_lower) == (  # type: ignore[attr-defined]
        "attached", "v", "n", "eth1")
    assert first.nw_fields == {"netdev": "nw-n-tap1"}  # type: ignore[attr-defined]
    assert first.levelno == logging.INFO and records[2].levelno == logging.WARNING
    assert made <= first.created < made + 1 and first.funcName == "main"
    assert events.PlainFormatter().format(first).endswith("v/n: first [event=attached lower=eth1 netdev=nw-n-tap1]")


def test_a_bad_log_call_does_not_raise_where_it_was_made() -> None:
    target = Collect()
    log = _logger(BurstBuffer(target, quiet=0.01))

    async def main() -> None:
        log.info("two %s %s", "args?")  # one argument for two
        log.info("fine")
        await until(lambda: target.lines == ["fine"], "the good entry")

    asyncio.run(main())


def test_entries_held_when_a_loop_ended_do_not_stall_the_next() -> None:
    target = Collect()
    log = _logger(BurstBuffer(target, quiet=0.01, longest=5.0))

    async def first() -> None:
        log.info("left held")  # its loop ends before the timer fires

    async def second() -> None:
        log.info("next loop")
        await until(lambda: target.lines == ["left held", "next loop"], "both written")

    asyncio.run(first())
    asyncio.run(second())
