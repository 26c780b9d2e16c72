"""Runtime records: what netwatch attached for each NIC, kept in state_dir.

A record is written (atomically) after every successful attach and removed
when the backend is gone. A restarted netwatch adopts a backend only when
the record, the kernel and QEMU all agree on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
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
from netwatch.nic.owndir import OwnDir, OwnTree, Unusable
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


class RecordStore:
    """``state_dir/nics/<vm>/<nic>.json``, one per attached NIC.

    Records are read back by a later netwatch and acted on (a recorded link
    may be deleted, its fields reach hooks), so nothing in one is believed
    that its path does not confirm, every field is checked as config input
    is, and a read that fails for a passing reason is an error, not an
    absent record. Below state_dir nothing is followed, and every
    directory and record must be netwatch's own and writable by it alone
    (the walk is netwatch/nic/owndir.py's).
    """

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        # Where records live, walked by fd without following (netwatch/nic/owndir.py).
        self.tree = OwnTree(state_dir, "nics")
        self.root = self.tree.path
        # Each refusal is said once (per path and reason), not at every read.
        self._said: dict[str, str] = {}

    # -- reading ------------------------------------------------------------

    def load(self, vm: str, nic: str) -> NicRecord | None:
        _check_names(vm, nic)
        try:
            with self._dir(vm) as where:
                return None if where is None else self._load_in(where, vm, nic)
        except Unusable as exc:
            self._refuse(f"{self.root}/{vm}/{nic}.json", str(exc))
            return None

    def all(self) -> list[NicRecord]:
        found = []
        try:
            with self._dir(None) as root:
                if root is None:
                    return []
                vms = sorted(_names(root))
                for vm in vms:
                    found += self._all_of(root, vm)
        except Unusable as exc:
            self._refuse(self.root, str(exc))
        return found

    def _all_of(self, root: OwnDir, vm: str) -> list[NicRecord]:
        where = f"{self.root}/{vm}"
        if not _NAME.match(vm):
            self._refuse(where, "not a runtime record netwatch writes")
            return []
        try:
            opened = root.sub(vm)
        except Unusable as exc:
            self._refuse(where, str(exc))
            return []
        except FileNotFoundError:  # removed meanwhile
            return []
        except OSError as exc:
            raise RecordError(f"cannot open {where}: {exc.strerror or exc}") from exc
        found = []
        with opened:
            for name in sorted(_names(opened)):
                if not name.endswith(".json"):
                    continue  # a temporary file of a save cut short
                nic = name[:-len(".json")]
                if not _NAME.match(nic):
                    self._refuse(f"{where}/{name}", "not a runtime record netwatch writes")
                    continue
                record = self._load_in(opened, vm, nic)
                if record is not None:
                    found.append(record)
        return found

    def _load_in(self, where: OwnDir, vm: str, nic: str) -> NicRecord | None:
        path = f"{self.root}/{vm}/{nic}.json"
        try:
            raw = where.read(f"{nic}.json", MAX_RECORD + 1)
        except Unusable as exc:
            self._refuse(path, str(exc))
            return None
        except OSError as exc:
            raise RecordError(f"cannot read the runtime record {path}: {exc.strerror or exc}") from exc
        if raw is None:
            return None
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
        name = f"{nic}.json"
        try:
            with self._dir(vm, create=True) as where:
                assert where is not None
                where.replace(name, data)
        except Unusable as exc:
            raise RecordError(f"cannot write the runtime record {self.root}/{vm}/{name}: {exc}") from exc
        except OSError as exc:
            raise RecordError(f"cannot write the runtime record {self.root}/{vm}/{name}: "
                              f"{exc.strerror or exc}") from exc
        self._said.pop(f"{self.root}/{vm}/{name}", None)

    def remove(self, vm: str, nic: str) -> None:
        _check_names(vm, nic)
        try:
            with self._dir(vm) as where:
                if where is not None:
                    where.remove(f"{nic}.json")
        except Unusable as exc:
            self._refuse(f"{self.root}/{vm}/{nic}.json", str(exc), "not removing")

    # -- the directories ------------------------------------------------------

    @contextlib.contextmanager
    def _dir(self, vm: str | None, create: bool = False) -> Iterator[OwnDir | None]:
        """``nics/<vm>`` (``nics`` for None), open; None if not there."""
        try:
            opened = self.tree.open(vm, create)
        except OSError as exc:
            raise RecordError(f"cannot use {self.root}: {exc.strerror or exc}") from exc
        if opened is None:
            yield None
            return
        with opened:
            yield opened

    def _refuse(self, path: str, why: str, doing: str = "ignoring") -> None:
        text = f"{doing} runtime record {path}: {why}"
        if self._said.get(path) != text:
            self._said[path] = text
            log.warning("%s", text)


def _check_names(vm: str, nic: str) -> None:
    if not (_NAME.match(vm) and _NAME.match(nic)):
        raise RecordError(f"refusing a runtime record path for {vm!r}/{nic!r}")


def _names(where: OwnDir) -> list[str]:
    try:
        return where.names()
    except OSError as exc:
        raise RecordError(f"cannot list {where.path}: {exc.strerror or exc}") from exc


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
