"""Runtime records: what netwatch attached for each NIC, kept in state_dir.

A record is written (atomically) after every successful attach and removed
when the backend is gone. A restarted netwatch adopts a backend only when
the record, the kernel and QEMU all agree on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

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


class RecordStore:
    def __init__(self, state_dir: str) -> None:
        self.root = Path(state_dir) / "nics"

    def _path(self, vm: str, nic: str) -> Path:
        return self.root / vm / f"{nic}.json"

    def load(self, vm: str, nic: str) -> NicRecord | None:
        path = self._path(vm, nic)
        try:
            data = json.loads(path.read_text())
            return NicRecord(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            # An unreadable record only costs a fresh attach.
            log.warning("ignoring unreadable runtime record %s: %s", path, exc)
            return None

    def save(self, record: NicRecord) -> None:
        path = self._path(record.vm, record.nic)
        tmp = f"{path}.tmp"
        # Write and rename: a crash of netwatch never leaves half a record. No
        # fsync: records describe the running host, which a reboot resets.
        data = json.dumps(asdict(record)).encode()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
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
            record = self.load(path.parent.name, path.stem)
            if record is not None:
                found.append(record)
        return found
