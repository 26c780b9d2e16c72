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
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

from netwatch.config import (
    BACKENDS,
    MACVTAP_MODES,
    MAX_QUEUES,
    TAP_MODES,
    WIRINGS,
    ifname_problem,
    mac_problem,
    parse_guest_pci,
    pci_problem,
)
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
    # Redirect wiring: the macvlan on the lower joined to the tap (ifname) by tc; none while the
    # persistent tap waits for its VM or lower (its record says the tap is netwatch's).
    macvlan: str = ""
    macvlan_ifindex: int = 0


class RecordError(NetwatchError):
    """A record could not be read or written for a reason that may pass (EMFILE, EIO), or its directory is not
    netwatch's own: retry, do not assume none."""


class _Unusable(Exception):
    """A directory or file on a record's path is not one netwatch made (a symlink, others may write it)."""


# The shapes of VM names and NIC ids that config accepts: a record's path
# components must have them, so no record names a file outside its directory.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "vm": (str,), "nic": (str,), "backend": (str,), "ifname": (str,), "ifindex": (int,), "lower": (str,),
    "lower_ifindex": (int,), "tap_netdev": (str,), "hub_netdev": (str,), "generation": (int,), "mac": (str,),
    "mode": (str,), "bridge": (str, type(None)), "qemu_pid": (int, type(None)), "swaps": (int,),
    "guest_pci": (str, type(None)), "qemu_start": (int, type(None)), "wiring": (str,), "queues": (int,),
    "configured": (bool,), "phase": (str,), "macvlan": (str,), "macvlan_ifindex": (int,),
}
_FIELD_NAMES = tuple(field.name for field in fields(NicRecord))
assert set(_FIELD_NAMES) == set(_FIELD_TYPES), "every record field has a checked type"
# Where each int field lies: ifindexes and generations are the kernel's and QEMU's
# positive ints, a pid at most the kernel's PID_MAX_LIMIT, a start time (clock ticks) a u64.
_INT32 = 2**31 - 1
_INT_RANGES = {"ifindex": (1, _INT32), "lower_ifindex": (0, _INT32), "generation": (1, _INT32),
               "swaps": (0, _INT32), "qemu_pid": (1, 4 * 1024 * 1024), "qemu_start": (0, 2**64 - 1),
               "queues": (1, MAX_QUEUES), "macvlan_ifindex": (0, _INT32)}

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted at a record's name must not block the event loop in open().
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


class RecordStore:
    """``state_dir/nics/<vm>/<nic>.json``, one per attached NIC.

    Records are read back by a later netwatch and acted on (a recorded link
    may be deleted, its fields reach hooks), so nothing in one is believed
    that its path does not confirm, every field is checked as config input
    is, and a read that fails for a passing reason is an error, not an
    absent record. Below state_dir nothing is followed: each directory is
    opened with O_NOFOLLOW and worked in by its fd, and it, like each
    record, must be netwatch's own and writable by it alone.
    """

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.root = os.path.join(state_dir, "nics")
        # Each refusal is said once (per path and reason), not at every read.
        self._said: dict[str, str] = {}

    # -- reading ------------------------------------------------------------

    def load(self, vm: str, nic: str) -> NicRecord | None:
        _check_names(vm, nic)
        try:
            with self._dir(vm) as fd:
                return None if fd is None else self._load_at(fd, vm, nic)
        except _Unusable as exc:
            self._refuse(f"{self.root}/{vm}/{nic}.json", str(exc))
            return None

    def all(self) -> list[NicRecord]:
        found = []
        try:
            with self._dir(None) as root:
                if root is None:
                    return []
                vms = sorted(_listdir(root, self.root))
                for vm in vms:
                    found += self._all_of(root, vm)
        except _Unusable as exc:
            self._refuse(self.root, str(exc))
        return found

    def _all_of(self, root: int, vm: str) -> list[NicRecord]:
        where = f"{self.root}/{vm}"
        if not _NAME.match(vm):
            self._refuse(where, "not a runtime record netwatch writes")
            return []
        try:
            fd = _open_dir(root, vm, where)
        except _Unusable as exc:
            self._refuse(where, str(exc))
            return []
        except FileNotFoundError:  # removed meanwhile
            return []
        except OSError as exc:
            raise RecordError(f"cannot open {where}: {exc.strerror or exc}") from exc
        found = []
        try:
            for name in sorted(_listdir(fd, where)):
                if not name.endswith(".json"):
                    continue  # a temporary file of a save cut short
                nic = name[:-len(".json")]
                if not _NAME.match(nic):
                    self._refuse(f"{where}/{name}", "not a runtime record netwatch writes")
                    continue
                record = self._load_at(fd, vm, nic)
                if record is not None:
                    found.append(record)
        finally:
            os.close(fd)
        return found

    def _load_at(self, fd: int, vm: str, nic: str) -> NicRecord | None:
        path = f"{self.root}/{vm}/{nic}.json"
        try:
            file = os.open(f"{nic}.json", _READ_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENOTDIR, errno.ENXIO):
                self._refuse(path, "not a plain file")
                return None
            raise RecordError(f"cannot read the runtime record {path}: {exc.strerror or exc}") from exc
        try:
            info = os.fstat(file)
            if not stat.S_ISREG(info.st_mode):
                self._refuse(path, "not a plain file")
                return None
            why = _not_own(info)
            if why:
                self._refuse(path, why)
                return None
            raw = os.read(file, MAX_RECORD + 1)
        except OSError as exc:
            raise RecordError(f"cannot read the runtime record {path}: {exc.strerror or exc}") from exc
        finally:
            os.close(file)
        try:
            return _parse(raw, vm, nic)
        except ValueError as exc:
            # A damaged or planted record only costs a fresh attach.
            self._refuse(path, clean(exc))
            return None

    # -- writing ------------------------------------------------------------

    def save(self, record: NicRecord) -> None:
        vm, nic = record.vm, record.nic
        _check_names(vm, nic)
        # Not asdict(): it deep-copies every field, a third of a save's cost.
        data = json.dumps({name: getattr(record, name) for name in _FIELD_NAMES}).encode()
        name, tmp = f"{nic}.json", f"{nic}.json.tmp"
        try:
            with self._dir(vm, create=True) as fd:
                assert fd is not None
                # Write and rename: a crash of netwatch never leaves half a
                # record. No fsync: records describe the running host, which a
                # reboot resets. O_EXCL|O_NOFOLLOW: a file planted at the
                # temporary name is never written through; a stale one is removed first.
                try:
                    file = os.open(tmp, _WRITE_FLAGS, 0o600, dir_fd=fd)
                except FileExistsError:  # left by a netwatch that died mid-save, or planted
                    os.unlink(tmp, dir_fd=fd)
                    file = os.open(tmp, _WRITE_FLAGS, 0o600, dir_fd=fd)
                try:
                    os.write(file, data)
                finally:
                    os.close(file)
                os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except _Unusable as exc:
            raise RecordError(f"cannot write the runtime record {self.root}/{vm}/{name}: {exc}") from exc
        except OSError as exc:
            raise RecordError(f"cannot write the runtime record {self.root}/{vm}/{name}: "
                              f"{exc.strerror or exc}") from exc
        self._said.pop(f"{self.root}/{vm}/{name}", None)

    def remove(self, vm: str, nic: str) -> None:
        _check_names(vm, nic)
        try:
            with self._dir(vm) as fd:
                if fd is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{nic}.json", dir_fd=fd)
        except _Unusable as exc:
            self._refuse(f"{self.root}/{vm}/{nic}.json", str(exc), "not removing")

    # -- the directories ------------------------------------------------------

    @contextlib.contextmanager
    def _dir(self, vm: str | None, create: bool = False) -> Iterator[int | None]:
        """An fd of ``nics/<vm>`` (``nics`` for None), each step opened without following; None if not there."""
        fds: list[int] = []
        try:
            yield self._open(vm, create, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _open(self, vm: str | None, create: bool, fds: list[int]) -> int | None:
        # state_dir is the admin's (the service checks it is its own at start): followed.
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            try:
                fds.append(os.open(self.state_dir, flags))
            except FileNotFoundError:
                if not create:
                    raise
                os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
                fds.append(os.open(self.state_dir, flags))
            fds.append(_open_dir(fds[-1], "nics", self.root, create))
            if vm is not None:
                fds.append(_open_dir(fds[-1], vm, f"{self.root}/{vm}", create))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RecordError(f"cannot use {self.root}: {exc.strerror or exc}") from exc
        return fds[-1]

    def _refuse(self, path: str, why: str, doing: str = "ignoring") -> None:
        text = f"{doing} runtime record {path}: {why}"
        if self._said.get(path) != text:
            self._said[path] = text
            log.warning("%s", text)


def _check_names(vm: str, nic: str) -> None:
    if not (_NAME.match(vm) and _NAME.match(nic)):
        raise RecordError(f"refusing a runtime record path for {vm!r}/{nic!r}")


def _not_own(info: os.stat_result) -> str | None:
    """Why a file or directory with ``info`` may not be netwatch's alone, or None."""
    if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"not netwatch's own and writable by it alone (owner uid {info.st_uid}, "
                f"mode {stat.S_IMODE(info.st_mode):04o})")
    return None


def _open_dir(parent: int, name: str, where: str, create: bool = False) -> int:
    """``name`` in ``parent``, a directory netwatch owns alone, opened without following a symlink.

    ``create``: made if missing (0700); a symlink or other file in its place
    (in netwatch's own directory) is removed first: the link itself, never
    what it points to.
    """
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        what = "a symlink" if exc.errno == errno.ELOOP else "not a directory"
        if not create:
            raise _Unusable(f"{where} is {what}") from None
        os.unlink(name, dir_fd=parent)
        log.warning("replaced %s with a directory of netwatch's own: it was %s, which is never followed",
                    where, what)
        os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    try:
        why = _not_own(os.fstat(fd))
    except OSError:
        os.close(fd)
        raise
    if why:
        os.close(fd)
        raise _Unusable(f"{where} is {why}")
    return fd


def _listdir(fd: int, where: str) -> list[str]:
    try:
        return os.listdir(fd)
    except OSError as exc:
        raise RecordError(f"cannot list {where}: {exc.strerror or exc}") from exc


MAX_RECORD = 64 * 1024


def _parse(raw: bytes, vm: str, nic: str) -> NicRecord:
    if len(raw) > MAX_RECORD:
        raise ValueError("larger than any record netwatch writes")
    try:
        data = json.loads(raw)
    except RecursionError:
        # Nesting (60,000 '[' fit in the size limit) exhausts the parser's
        # stack: a flat object is all netwatch writes.
        raise ValueError("nested deeper than any record netwatch writes") from None
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
    if record.backend not in BACKENDS:
        raise ValueError("it does not describe a netwatch backend")
    why = _field_problem(record)
    if why:
        raise ValueError(why)
    return record


def _field_problem(record: NicRecord) -> str | None:
    """What in ``record`` no config and no kernel could have given it (every field reaches a hook or a link), or None.

    The checks are the config's own (netwatch/config.py): a record is input too.
    """
    for key, (low, high) in _INT_RANGES.items():
        value = getattr(record, key)
        if value is not None and not low <= value <= high:
            return f"field {key!r}: {value} is not between {low} and {high}"
    modes = TAP_MODES if record.backend == "tap" else MACVTAP_MODES
    choices: dict[str, tuple[str, ...]] = {"mode": modes, "wiring": WIRINGS, "phase": ("", "in", "out")}
    for key, allowed in choices.items():
        if getattr(record, key) not in allowed:
            return f"field {key!r}: {clean(getattr(record, key), 20)} is not one of {', '.join(allowed)}"
    # The lower as the NIC's lower spec describes it: a name, a MAC or a PCI address ("" for none yet).
    checks: list[tuple[str, str | None, Callable[[str], str | None]]] = [
        ("ifname", record.ifname, ifname_problem), ("bridge", record.bridge, ifname_problem),
        ("mac", record.mac, _guest_mac_problem),
        ("lower", record.lower, _lower_problem),
        ("guest_pci", record.guest_pci, _guest_pci_problem),
        # QEMU ids as the wiring names them (netwatch/qemu/hub.py, direct.py; config's netdev_id for redirect).
        ("tap_netdev", record.tap_netdev, _expect(f"nwr-{record.nic}" if record.wiring == "redirect"
                                                  else f"nw-{record.nic}-tap{record.generation}")),
        ("hub_netdev", record.hub_netdev,
         _expect(f"nw-{record.nic}-up{record.generation}" if record.wiring == "hub" else "")),
        ("macvlan", record.macvlan or None, ifname_problem),
    ]
    if bool(record.macvlan) != (record.macvlan_ifindex > 0) or (record.macvlan and record.wiring != "redirect"):
        return "field 'macvlan': only a redirect NIC's record names a macvlan, with its ifindex"
    for key, value, check in checks:
        why = check(value) if value is not None else None
        if why:
            return f"field {key!r}: {clean(value, 40)} {why}"
    return None


def _guest_mac_problem(value: str) -> str | None:
    return mac_problem(value) or (None if value == value.lower() else "is not written as netwatch writes it")


def _lower_problem(value: str) -> str | None:
    if not value or ifname_problem(value) is None or mac_problem(value) is None or pci_problem(value) is None:
        return None
    return "is not an interface name, a MAC or a PCI address"


def _guest_pci_problem(value: str) -> str | None:
    slot = parse_guest_pci(value)
    return None if slot is not None and slot.slot <= 0x1F else "is not a PCI slot netwatch gives"


def _expect(wanted: str) -> Callable[[str], str | None]:
    return lambda value: None if value == wanted else f"is not {wanted!r}, as its NIC and generation say"
