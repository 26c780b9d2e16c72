"""The per-NIC state machine: what moves a NIC from each state, and what may not.

A NIC changes state only on an event, and the table says which events each
state takes and where each leads; anything else is a bug in the controller
(IllegalTransition). The states are the ones `status` reports.

    state          event           ->  state         (why)
    waiting-vm     qemu-gone           waiting-vm     still no QEMU
                   peer-refused        failed         a QEMU that is not provably the VM's
                   lower-missing       waiting-lower  QEMU is there, the lower is not
                   attach              attaching
                   kept                attached       an earlier run's backend adopted
                   error               failed
    waiting-lower  qemu-gone           waiting-vm
                   peer-refused        failed
                   lower-missing       waiting-lower
                   attach              attaching      the lower appeared
                   error               failed
    attaching      attached            attached       the backend is in place
                   lower-vanished      waiting-lower  the lower went while it was made
                   error               failed
    attached       qemu-gone           waiting-vm
                   peer-refused        failed
                   lower-missing       waiting-lower  the backend went with its lower
                   attach              attaching      its backend died; the lower is back
                   kept                attached       checked, still right
                   error               failed
    failed         every event but attached and lower-vanished: a retry starts from scratch

So an attach always passes through `attaching`, and only there can a NIC
be `attached` anew; a NIC waiting for its lower is never `attached`
without being made; nothing but the outcome of the attach (or a failure)
leaves `attaching`; `failed` is left only by what a fresh pass finds.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from datetime import UTC, datetime

from netwatch import events
from netwatch.untrusted import clean


class NicState(enum.Enum):
    WAITING_VM = "waiting-vm"
    WAITING_LOWER = "waiting-lower"
    ATTACHING = "attaching"
    ATTACHED = "attached"
    FAILED = "failed"


class NicEvent(enum.Enum):
    QEMU_GONE = "qemu-gone"
    PEER_REFUSED = "peer-refused"
    LOWER_MISSING = "lower-missing"
    LOWER_VANISHED = "lower-vanished"
    ATTACH = "attach"
    ATTACHED = "attached"
    KEPT = "kept"
    ERROR = "error"


S, E = NicState, NicEvent
TRANSITIONS: dict[NicState, dict[NicEvent, NicState]] = {
    S.WAITING_VM: {E.QEMU_GONE: S.WAITING_VM, E.PEER_REFUSED: S.FAILED, E.LOWER_MISSING: S.WAITING_LOWER,
                   E.ATTACH: S.ATTACHING, E.KEPT: S.ATTACHED, E.ERROR: S.FAILED},
    S.WAITING_LOWER: {E.QEMU_GONE: S.WAITING_VM, E.PEER_REFUSED: S.FAILED, E.LOWER_MISSING: S.WAITING_LOWER,
                      E.ATTACH: S.ATTACHING, E.ERROR: S.FAILED},
    S.ATTACHING: {E.ATTACHED: S.ATTACHED, E.LOWER_VANISHED: S.WAITING_LOWER, E.ERROR: S.FAILED},
    S.ATTACHED: {E.QEMU_GONE: S.WAITING_VM, E.PEER_REFUSED: S.FAILED, E.LOWER_MISSING: S.WAITING_LOWER,
                 E.ATTACH: S.ATTACHING, E.KEPT: S.ATTACHED, E.ERROR: S.FAILED},
    S.FAILED: {E.QEMU_GONE: S.WAITING_VM, E.PEER_REFUSED: S.FAILED, E.LOWER_MISSING: S.WAITING_LOWER,
               E.ATTACH: S.ATTACHING, E.KEPT: S.ATTACHED, E.ERROR: S.FAILED},
}

# The journal event a transition into a state is reported as.
_EVENT_FOR = {S.ATTACHED: "attached", S.FAILED: "error", S.WAITING_LOWER: "state",
              S.WAITING_VM: "state", S.ATTACHING: "state"}


class IllegalTransition(AssertionError):
    """A bug: the controller reported an event the NIC's state does not take."""


class NicStateMachine:
    """Current state of one NIC, with its cause and time of the last change."""

    def __init__(self, vm: str, nic: str, on_change: Callable[[], None] | None = None) -> None:
        self.vm = vm
        self.nic = nic
        self.on_change = on_change
        self.state = NicState.WAITING_VM
        self.cause = "service started"
        self.changed_at = time.time()

    def on(self, event: NicEvent, cause: str, lower: str | None = None) -> bool:
        """``event`` happened because of ``cause``: move as the table says; False if the state stays."""
        new = TRANSITIONS[self.state].get(event)
        if new is None:
            raise IllegalTransition(f"{self.vm}/{self.nic}: {event.value} in {self.state.value} ({cause})")
        if new is self.state:
            return False
        # A cause may quote QEMU's or the kernel's words: kept to one short line.
        cause = clean(cause)
        old, self.state, self.cause, self.changed_at = self.state, new, cause, time.time()
        events.emit(_EVENT_FOR[new], f"{old.value} -> {new.value}: {cause}", vm=self.vm, nic=self.nic,
                    lower=lower, state=new.value, previous=old.value)
        if self.on_change is not None:
            self.on_change()
        return True

    @property
    def last_change(self) -> str:
        return datetime.fromtimestamp(self.changed_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
