"""Journal event kinds: each has a stable MESSAGE_ID and a priority.

Every state change and action is logged once through :func:`emit`, which
attaches the fields the journal handler turns into NETWATCH_* fields.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

from netwatch.logbuffer import BurstBuffer, Entry
from netwatch.untrusted import one_line

log = logging.getLogger("netwatch")
# Set by setup(): entries go to it without logging's record-making while they come in a burst.
_buffer: BurstBuffer | None = None


@dataclass(frozen=True)
class EventKind:
    message_id: str
    level: int


EVENT_KINDS: dict[str, EventKind] = {
    "lower-lost": EventKind("4afc024b907e4e9dabf65855d0b4c5f2", logging.WARNING),
    "lower-back": EventKind("b334230a5aa24bd29fe8a6d157afc406", logging.INFO),
    "attached": EventKind("9011866cf6a54766b90f7b7fd6042819", logging.INFO),
    "detached": EventKind("cc26cb3306fa47e5a54464f8df2eb64e", logging.INFO),
    "rebind": EventKind("3615e0afd01b406c91521d76e37a85bb", logging.INFO),
    "link-up": EventKind("56332ec682bb481fa973741ebd46cd28", logging.INFO),
    "link-down": EventKind("35ef7575afde427891f1d9e8f918dd3d", logging.INFO),
    "hook-failed": EventKind("d54e0905a8124de9a2ba8c7dd6f6ad1a", logging.WARNING),
    "error": EventKind("3599292c6c47449a81bb4b1aafc697d7", logging.ERROR),
    "state": EventKind("fcccc06de7ff4cc2ab8b830625516cb9", logging.INFO),
    "vm-connected": EventKind("263bdfb6a9a941b59da7a37724d44856", logging.INFO),
    "vm-gone": EventKind("a142ecc8da784d71a0a3ca6de7f4708c", logging.WARNING),
    "resync": EventKind("305b842266314a9282ce6521e0763860", logging.WARNING),
    "hot-add": EventKind("0075e4774559423889cab455184c776c", logging.INFO),
    "hot-remove": EventKind("93179a04b97c48d6bd5072ecc6bfbdd2", logging.INFO),
    "run-state": EventKind("c9c827c60d6844a2bbdaaea1f7679284", logging.INFO),
    "migration-incoming": EventKind("e9de9916489d44c399edd39e1f0a236e", logging.INFO),
    "migration-finishing": EventKind("bb52b3ac0b274ab8a7ab38b3076967cc", logging.INFO),
    "migration-completed": EventKind("9777bb8953584ff9b27fc9f4cdcec774", logging.INFO),
    "migration-arrived": EventKind("3125c782f7b44038954f85ad55cb1314", logging.INFO),
    "migration-failed": EventKind("176448c20294472d8ded1e964cea2e9f", logging.WARNING),
    "run-state-flood": EventKind("671eed9253294930bfdcabcc3191ec63", logging.WARNING),
    "filters-restored": EventKind("5f0d8c5be2c44f5a9c8f3a1e6b7d2c94", logging.WARNING),
    "lower-replaced": EventKind("5da672fd335c49da8d8af96a2a090ca7", logging.WARNING),
    "service": EventKind("a90120ef32f54a34aabb5e9cd4d3f8de", logging.INFO),
}


def emit(kind: str, message: str, *, vm: str | None = None, nic: str | None = None,
         lower: str | None = None, level: int | None = None, **fields: object) -> None:
    """Log one event with its structured fields."""
    event = EVENT_KINDS[kind]
    level = event.level if level is None else level
    if not log.isEnabledFor(level):
        return
    # Logger.log() would find the caller by walking and testing every frame;
    # the caller is one frame up. With 256 NICs reattaching at once, each
    # writing four entries, logging's own machinery was a tenth of the work.
    caller = sys._getframe(1)
    code = caller.f_code
    extra: dict[str, object] = {"nw_event": kind, "nw_message_id": event.message_id, "nw_vm": vm, "nw_nic": nic,
                                "nw_lower": lower, "nw_fields": fields}
    buffer = _buffer
    if buffer is not None and buffer in logging.root.handlers and buffer.hold(
            Entry(log.name, level, code.co_filename, caller.f_lineno, message, code.co_name, extra)):
        return
    record = log.makeRecord(log.name, level, code.co_filename, caller.f_lineno, message, (), None, code.co_name,
                            extra)
    log.handle(record)


class PlainFormatter(logging.Formatter):
    """One line per entry for stderr, with a UTC timestamp and the journal's fields as text:

    ``2026-11-22T01:02:03.456Z netwatch[42]: warning: web1/net0: lower eth1 is gone [event=lower-lost lower=eth1]``
    """

    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        vm = getattr(record, "nw_vm", None)
        nic = getattr(record, "nw_nic", None)
        where = "/".join(part for part in (vm, nic) if part)
        text = one_line(record.getMessage())
        if record.exc_info and record.levelno >= logging.ERROR:
            text += " | " + one_line(self.formatException(record.exc_info))
        fields = {"event": getattr(record, "nw_event", None), "lower": getattr(record, "nw_lower", None),
                  **(getattr(record, "nw_fields", None) or {})}
        extra = " ".join(f"{key}={one_line(str(value))}" for key, value in fields.items() if value is not None)
        second = int(record.created)
        if second != self._second:  # one strftime a second, not one an entry
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        stamp = f"{self._stamp}.{int(record.msecs):03d}Z"
        line = f"{stamp} netwatch[{record.process}]: {record.levelname.lower()}: "
        line += f"{where}: {text}" if where else text
        return f"{line} [{extra}]" if extra else line


def setup(verbose: bool = False) -> None:
    """Log to the journal when there is one (or systemd started us), else plain lines on stderr.

    The journal handler falls back to the same plain lines whenever the
    journal refuses a message, and uses the journal again once it answers.
    Entries made in a burst are written once it quiets down (netwatch/logbuffer.py).
    """
    global _buffer
    from netwatch.service.journal import JournalHandler
    plain = logging.StreamHandler()
    plain.setFormatter(PlainFormatter())
    under_systemd = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
    handler: logging.Handler = JournalHandler(fallback=plain) if under_systemd or JournalHandler.available() \
        else plain
    # A handler that fails (stderr closed, say) must not print a traceback per message.
    logging.raiseExceptions = False
    # One thread, one process: neither handler shows thread or multiprocessing
    # names, and looking them up was a tenth of an entry's cost.
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    if _buffer is not None:
        _buffer.flush()  # a second setup() loses nothing the first one held
    _buffer = BurstBuffer(handler)
    root.handlers[:] = [_buffer]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Library chatter (qemu.qmp logs every disconnect at ERROR) is not ours.
    for name in ("qemu", "pyroute2"):
        logging.getLogger(name).setLevel(logging.CRITICAL if not verbose else logging.DEBUG)
    # asyncio logs at ERROR only what no code caught (an exception in a callback
    # or in a control connection's task): a bug, which must not pass in silence.
    logging.getLogger("asyncio").setLevel(logging.ERROR if not verbose else logging.DEBUG)
