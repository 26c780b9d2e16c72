"""The per-NIC state machine: states, the allowed transitions, one log line each."""

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


S = NicState
TRANSITIONS: dict[NicState, frozenset[NicState]] = {
    S.WAITING_VM: frozenset({S.WAITING_LOWER, S.ATTACHING, S.ATTACHED, S.FAILED}),
    S.WAITING_LOWER: frozenset({S.ATTACHING, S.WAITING_VM, S.FAILED}),
    S.ATTACHING: frozenset({S.ATTACHED, S.FAILED, S.WAITING_VM, S.WAITING_LOWER}),
    S.ATTACHED: frozenset({S.ATTACHING, S.WAITING_LOWER, S.WAITING_VM, S.FAILED}),
    S.FAILED: frozenset({S.ATTACHING, S.ATTACHED, S.WAITING_LOWER, S.WAITING_VM}),
}

# The journal event a transition into a state is reported as.
_EVENT_FOR = {S.ATTACHED: "attached", S.FAILED: "error", S.WAITING_LOWER: "state",
              S.WAITING_VM: "state", S.ATTACHING: "state"}


class IllegalTransition(AssertionError):
    """A bug: the reconciler asked for a transition the table forbids."""


class NicStateMachine:
    """Current state of one NIC, with its cause and time of the last change."""

    def __init__(self, vm: str, nic: str, on_change: Callable[[], None] | None = None) -> None:
        self.vm = vm
        self.nic = nic
        self.on_change = on_change
        self.state = NicState.WAITING_VM
        self.cause = "service started"
        self.changed_at = time.time()

    def to(self, new: NicState, cause: str, lower: str | None = None) -> bool:
        """Move to ``new`` because of ``cause``; False if already there."""
        if new is self.state:
            return False
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self.vm}/{self.nic}: {self.state.value} -> {new.value} ({cause})")
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
