"""Runtime records: what netwatch attached for each NIC, kept in state_dir.

A record is written (atomically) after every successful attach and removed
when the backend is gone. A restarted netwatch adopts a backend only when
the record, the kernel and QEMU all agree on it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from netwatch.config import ifname_problem
from netwatch.errors import NetwatchError
from netwatch.untrusted import clean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NicRecord:
    vm: str
    nic: str
    backend: str
    ifname: str
    ifindex: int
    lower: str
    lower_ifindex: int
    tap_netdev: str
    hub_netdev: str
    generation: int
    mac: str
    mode: str
    bridge: str | None
    qemu_pid: int | None
    swaps: int = 0
    guest_pci: str | None = None
    # QEMU's start time (clock ticks since boot): with qemu_pid, names that process for good.
    qemu_start: int | None = None
    wiring: str = "hub"
    queues: int = 1
    # Whether its if-up hooks ran and an if-down is owed (a routed tap waits
    # for its guest to run on this host: netwatch/nic/migration.py).
    configured: bool = True
    # The VM's migration phase when last seen: "in" (this QEMU receives the
    # guest, which has not run here yet), "out" (it sent the guest away), "".
    phase: str = ""


class RecordError(NetwatchError):
    """A record could not be read for a reason that may pass (EMFILE, EIO): retry, do not assume none."""


# The shapes of VM names and NIC ids that config accepts: a record's path
# components must have them, so no record names a file outside its directory.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "vm": (str,), "nic": (str,), "backend": (str,), "ifname": (str,), "ifindex": (int,), "lower": (str,),
    "lower_ifindex": (int,), "tap_netdev": (str,), "hub_netdev": (str,), "generation": (int,), "mac": (str,),
    "mode": (str,), "bridge": (str, type(None)), "qemu_pid": (int, type(None)), "swaps": (int,),
    "guest_pci": (str, type(None)), "qemu_start": (int, type(None)), "wiring": (str,), "queues": (int,),
    "configured": (bool,), "phase": (str,),
}
_FIELD_NAMES = tuple(field.name for field in fields(NicRecord))
assert set(_FIELD_NAMES) == set(_FIELD_TYPES), "every record field has a checked type"


class RecordStore:
    """``state_dir/nics/<vm>/<nic>.json``, one per attached NIC.

    Records are read back by a later netwatch and acted on (a recorded link
    may be deleted), so nothing in one is believed that its path does not
    confirm, symlinks are never followed, and a read that fails for a
    passing reason is an error, not an absent record.
    """

    def __init__(self, state_dir: str) -> None:
        self.root = Path(state_dir) / "nics"

    def _path(self, vm: str, nic: str) -> Path:
        if not (_NAME.match(vm) and _NAME.match(nic)):
            raise RecordError(f"refusing a runtime record path for {vm!r}/{nic!r}")
        return self.root / vm / f"{nic}.json"

    def load(self, vm: str, nic: str) -> NicRecord | None:
        path = self._path(vm, nic)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENOTDIR):
                log.warning("ignoring runtime record %s: not a plain file", path)
                return None
            raise RecordError(f"cannot read the runtime record {path}: {exc.strerror or exc}") from exc
        try:
            with os.fdopen(fd, "rb") as file:
                raw = file.read(MAX_RECORD + 1)
        except OSError as exc:
            raise RecordError(f"cannot read the runtime record {path}: {exc.strerror or exc}") from exc
        try:
            return _parse(raw, vm, nic)
        except ValueError as exc:
            # A damaged or planted record only costs a fresh attach.
            log.warning("ignoring runtime record %s: %s", path, clean(exc))
            return None

    def save(self, record: NicRecord) -> None:
        path = self._path(record.vm, record.nic)
        tmp = f"{path}.tmp"
        # Write and rename: a crash of netwatch never leaves half a record. No
        # fsync: records describe the running host, which a reboot resets.
        # O_EXCL|O_NOFOLLOW: a file planted at the temporary name is never
        # written through; a stale one is removed first.
        # Not asdict(): it deep-copies every field, a third of a save's cost.
        data = json.dumps({name: getattr(record, name) for name in _FIELD_NAMES}).encode()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:  # left by a netwatch that died mid-save, or planted
            os.unlink(tmp)
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:  # the VM's first record (the common case skips the mkdir calls)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def remove(self, vm: str, nic: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(vm, nic).unlink()

    def all(self) -> list[NicRecord]:
        found = []
        for path in sorted(self.root.glob("*/*.json")):
            vm, nic = path.parent.name, path.stem
            if not (_NAME.match(vm) and _NAME.match(nic)) or path.parent.is_symlink():
                log.warning("ignoring %s: not a runtime record netwatch writes", path)
                continue
            record = self.load(vm, nic)
            if record is not None:
                found.append(record)
        return found


MAX_RECORD = 64 * 1024


def _parse(raw: bytes, vm: str, nic: str) -> NicRecord:
    if len(raw) > MAX_RECORD:
        raise ValueError("larger than any record netwatch writes")
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    unknown = set(data) - set(_FIELD_TYPES)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    for key, kinds in _FIELD_TYPES.items():
        if key in data and (not isinstance(data[key], kinds)
                            or (isinstance(data[key], bool) and bool not in kinds)):
            raise ValueError(f"field {key!r} has the wrong type")
    try:
        record = NicRecord(**data)
    except TypeError as exc:
        raise ValueError("fields are missing") from exc
    if (record.vm, record.nic) != (vm, nic):
        raise ValueError(f"it names {record.vm!r}/{record.nic!r}, not the VM and NIC of its path")
    if ifname_problem(record.ifname) or record.backend not in ("macvtap", "tap") or record.ifindex <= 0:
        raise ValueError("it does not describe a netwatch backend")
    if record.phase not in ("", "in", "out"):
        raise ValueError(f"unknown migration phase {clean(record.phase, 20)}")
    return record
