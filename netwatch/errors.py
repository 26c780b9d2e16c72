"""One error tree: every failure netwatch reports derives from NetwatchError.

``str(error)`` is the one sentence a user sees; the cause (``__cause__``)
carries the detail the journal gets.
"""

from __future__ import annotations


class NetwatchError(Exception):
    """Root of every error netwatch raises on purpose."""


class BadRequest(NetwatchError):
    """The user asked for something that cannot be (exit status 2)."""


class ConfigError(BadRequest):
    """The configuration is unusable; ``problems`` holds one line per fault."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class LinkError(NetwatchError):
    """A netlink operation on a host link failed; ``errno`` says how."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class DeviceError(NetwatchError):
    """A backend character device could not be opened safely."""


class QmpError(NetwatchError):
    """A QMP command failed, timed out, or the monitor went away."""


class ControlError(NetwatchError):
    """The control socket could not be reached or answered with an error."""

    def __init__(self, message: str, bad_request: bool = False, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.bad_request = bad_request
        self.problems = problems or [message]


class ServiceNotRunning(ControlError):
    """No netwatch service is listening on the control socket."""
