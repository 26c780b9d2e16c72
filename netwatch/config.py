"""The configuration file: TOML in, frozen dataclasses out, validated once here.

Every problem found is reported, one line each, naming the file, the VM/NIC
and the key, so that an admin can fix a file in one pass.
"""

from __future__ import annotations

import functools
import grp
import hashlib
import os
import pwd
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from netwatch.errors import ConfigError
from netwatch.qemu.peer import Identity, libvirt_machine_name

DEFAULT_PATH = "/etc/netwatch/netwatch.toml"

MACVTAP_MODES = ("bridge", "vepa", "private", "passthru")
TAP_MODES = ("bridged", "routed")
BACKENDS = ("macvtap", "tap")
WIRINGS = ("hub", "direct", "redirect")
MACHINES = ("pc", "q35")
# virtio-net takes up to 1024 queue pairs; past a few dozen a guest gains nothing.
MAX_QUEUES = 64
# q35's root bus does not hotplug: a NIC netwatch adds or removes there sits
# behind a pcie-root-port of its own, and a VM needs spare ports for NICs
# hot-added later (they cannot be hot-added either).
DEFAULT_SPARE_PORTS = 2
UDEV_MODES = ("auto", "udev", "kernel", "off")

# QEMU's id rule (id_wellformed): a letter first, then letters, digits, - . _
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
# NIC ids become parts of QMP ids "nw-<id>-tap<generation>" (32 chars at most).
NIC_ID_MAX = 15
# "nw-<id>" is the guest port and "nw-<id>-tap<N>" a backend: an id ending
# in -tap<N> would make one NIC's guest port another's backend.
_RESERVED_SUFFIX = re.compile(r"-(tap|up|fd)\d+\Z")
VM_NAME_MAX = 64
_VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}\Z")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
_PCI = re.compile(r"([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]\Z")
IFNAME_MAX = 15
# guest_pci: "[bus:]slot", slot in hex as QEMU's addr= takes it ("0x1a", "1a").
_GUEST_PCI = re.compile(r"(?:(?P<bus>[A-Za-z][A-Za-z0-9._-]*):)?(?:0x)?(?P<slot>[0-9a-fA-F]{1,2})(?:\.0)?\Z")
# Default slots on the root bus, taken in this order by the NICs that do not
# set guest_pci. libvirt and a plain QEMU command line fill bus 0 from its
# low slots up (libvirt's own hotplug takes the lowest free slot too) and
# put chipset devices at the top on q35 (0x1a/0x1d USB, 0x1b sound, 0x1c
# root ports, 0x1e DMI-PCI bridge, 0x1f LPC/SATA/SMBus). Proxmox VE maps
# every slot of bus 0 on pc: these are its vga1-3 (0x18-0x1a, Windows with
# multi-monitor qxl only) and net5..net3 (0x17-0x15), and on q35 its NICs
# sit behind a bridge. docs/pci-slots.md has the whole table.
DEFAULT_GUEST_SLOTS = (0x19, 0x18, 0x17, 0x16, 0x15, 0x13, 0x12)


def default_config_path() -> str:
    return os.environ.get("NETWATCH_CONFIG") or DEFAULT_PATH


@dataclass(frozen=True)
class LowerSpec:
    """How to recognise a lower link: every given key must match."""

    name: str | None = None
    mac: str | None = None
    pci: str | None = None

    def describe(self) -> str:
        if self.name:
            return self.name
        return self.mac or self.pci or "?"


@dataclass(frozen=True)
class GuestPci:
    """Where the NIC sits in the guest: a slot on the root bus, or on a named bus."""

    slot: int
    bus: str | None = None

    def __str__(self) -> str:
        return f"{self.bus}:{self.slot:#04x}" if self.bus else f"{self.slot:#04x}"

    @property
    def device_props(self) -> str:
        """The ``-device`` properties that pin it (function 0 always)."""
        return f"bus={self.bus},addr={self.slot:#04x}" if self.bus else f"addr={self.slot:#04x}"

    @property
    def port_id(self) -> str:
        """The id of the pcie-root-port at this slot of q35's root bus (netwatch's own)."""
        return f"nw-rp{self.slot:02x}"

    def placement(self, machine: str) -> dict[str, str]:
        """Where a NIC at this address goes: device_add's bus/addr (q35: behind its root port)."""
        if self.bus is not None:
            return {"bus": self.bus, "addr": f"{self.slot:#04x}"}
        if machine == "q35":
            return {"bus": self.port_id, "addr": "0x0"}
        return {"addr": f"{self.slot:#04x}"}


@dataclass(frozen=True)
class NicConfig:
    id: str
    backend: str
    mac: str
    hub: int
    model: str
    ifname: str
    lower: LowerSpec | None = None
    mode: str = "bridge"
    bridge: str | None = None
    guest_pci: GuestPci | None = None
    # Whether guest_pci was set in the file (a default slot is not, and may be
    # kept from what the NIC already has in a running guest).
    guest_pci_set: bool = False
    wiring: str = "hub"
    queues: int = 1

    @property
    def guest_port(self) -> str:
        """The fixed hubport the guest NIC is peered with."""
        return f"nw-{self.id}"

    @functools.cached_property
    def backend_names(self) -> tuple[str, str]:
        """The two names this NIC's backend link may have (redirect: the persistent tap is ``ifname``)."""
        return self.ifname, alt_ifname(self.ifname)

    @functools.cached_property
    def macvlan_names(self) -> tuple[str, ...]:
        """Redirect wiring: the two names the macvlan on the lower may have (make-before-break
        needs both at once); no names for the other wirings."""
        if self.wiring != "redirect":
            return ()
        first = macvlan_ifname(self.ifname)
        return first, alt_ifname(first)

    @property
    def link_names(self) -> tuple[str, ...]:
        """Every host link name this NIC may own: its backend's two, then its macvlan's."""
        return self.backend_names + self.macvlan_names

    @property
    def netdev_id(self) -> str:
        """Redirect wiring: the id of the tap netdev QEMU opens ``ifname`` with.

        Not ``guest_port``: hub and direct wirings delete a netdev of that
        name as a stale hubport. "nwr-" starts no other netdev netwatch names
        ("nw-<id>", "nw-<id>-tapN", "nw-<id>-upN"), and NIC ids are unique
        per VM, so it is unique too; 19 chars at most, a letter first.
        """
        return f"nwr-{self.id}"


@dataclass(frozen=True)
class VmConfig:
    name: str
    # None: netwatch has no monitor for this VM (all its NICs redirect-wired; a libvirt domain's monitor is libvirt's).
    qmp: str | None
    nics: tuple[NicConfig, ...] = ()
    # What proves the QMP peer is this VM's QEMU (peer.py): each optional.
    uuid: str | None = None
    qemu_user: str | None = None
    cgroup: str | None = None
    machine: str = "pc"
    spare_ports: int = 0
    libvirt_domain: str | None = None

    @property
    def identity(self) -> Identity:
        return Identity(uuid=self.uuid, qemu_user=self.qemu_user, cgroup=self.cgroup,
                        libvirt_domain=self.libvirt_domain)


@dataclass(frozen=True)
class Settings:
    state_dir: str = "/run/netwatch"
    hooks_dir: str = "/etc/netwatch"
    udev: str = "auto"
    hook_timeout: float = 10.0
    # Seconds a guest has to release a NIC after device_del (hot-remove, replug).
    unplug_timeout: float = 15.0
    # Seconds a migration target waits, once the guest runs there, before it
    # configures routed taps: the source deconfigures them meanwhile.
    migration_handover: float = 0.25
    # node_exporter's textfile collector reads *.prom files from its directory.
    metrics_file: str | None = None
    qmp_timeout: float = 5.0
    control_group: str | None = None
    netlink_rcvbuf: int = 8 * 1024 * 1024
    # Where macvtap device nodes are made; on a filesystem without nodev.
    device_dir: str | None = None

    @property
    def node_dir(self) -> str:
        return self.device_dir or os.path.join(self.state_dir, "dev")


@dataclass(frozen=True)
class Config:
    path: str
    settings: Settings = field(default_factory=Settings)
    vms: tuple[VmConfig, ...] = ()

    def vm(self, name: str) -> VmConfig | None:
        return next((vm for vm in self.vms if vm.name == name), None)


def derived_ifname(vm: str, nic: str) -> str:
    """The backend interface name for a NIC: readable when it fits in 15 bytes."""
    name = f"nw-{vm}-{nic}"
    if len(name.encode()) <= IFNAME_MAX:
        return name
    digest = hashlib.blake2s(f"{vm}/{nic}".encode(), digest_size=6).hexdigest()
    return f"nw-{digest}"


def alt_ifname(ifname: str) -> str:
    """The NIC's second backend name: make-before-break needs two at once."""
    suffix = "-s" if ifname.endswith("-r") else "-r"
    if len(ifname.encode()) <= IFNAME_MAX - 2:
        return ifname + suffix
    # Cut short, names sharing a prefix ("nw-web1-ua-net0", "nw-web1-ua-net1")
    # would share a second name: a digest of the whole name keeps them apart.
    digest = hashlib.blake2s(ifname.encode(), digest_size=3).hexdigest()
    return f"{ifname.encode()[:7].decode(errors='ignore')}{digest}{suffix}"


def macvlan_ifname(ifname: str) -> str:
    """The first name of a redirect NIC's macvlan, from its tap's (unique) name.

    Readable ("nw-web1-net0" -> "nwm-web1-net0") when the tap's name is a
    netwatch one of 13 bytes or less; else "nwm-" and 11 hex digits of a
    digest, 15 bytes, so the two forms never meet (14 bytes at most against
    exactly 15 with no "-" after the prefix). Either way it starts "nwm-",
    which no derived tap name ("nw-...") does.
    """
    if ifname.startswith("nw-") and len(ifname.encode()) <= IFNAME_MAX - 2:
        return "nwm-" + ifname[3:]
    digest = hashlib.blake2s(ifname.encode(), digest_size=6, person=b"macvlan").hexdigest()
    return f"nwm-{digest[:11]}"


def parse_guest_pci(value: str | None) -> GuestPci | None:
    """A slot as str(GuestPci) writes it (runtime records), or None."""
    match = _GUEST_PCI.match(value) if value else None
    if match is None:
        return None
    return GuestPci(slot=int(match.group("slot"), 16), bus=match.group("bus"))


def default_wiring(backend: str) -> str:
    """The wiring a NIC gets when the file does not say (README "How to pick a wiring" has the figures).

    A macvtap dies with its lower, so each lower flap replaces it: the hub
    hides that from the guest. A tap's fd outlives its bridge and uplink,
    so it is almost never replaced: it gets full speed.
    """
    return "direct" if backend == "tap" else "hub"


def assign_slots(nics: list[NicConfig], kept: Mapping[str, GuestPci]) -> tuple[list[NicConfig], list[str]]:
    """Slots for the NICs whose file gives none: the one in ``kept`` (by NIC id: where a
    running guest has it), else the first free default. Returns the NICs and the ids left without one.
    """
    taken = {nic.guest_pci for nic in nics if nic.guest_pci_set and nic.guest_pci is not None}
    placed: dict[str, NicConfig] = {}
    for nic in nics:
        if nic.guest_pci_set:
            placed[nic.id] = nic
        elif (slot := kept.get(nic.id)) is not None and slot not in taken:
            taken.add(slot)
            placed[nic.id] = replace(nic, guest_pci=slot)
    short = []
    free = [GuestPci(slot) for slot in DEFAULT_GUEST_SLOTS if GuestPci(slot) not in taken]
    for nic in nics:
        if nic.id in placed:
            continue
        if not free:
            short.append(nic.id)
            continue
        placed[nic.id] = replace(nic, guest_pci=free.pop(0))
    return [placed[nic.id] for nic in nics if nic.id in placed], short


def ifname_problem(value: str) -> str | None:
    """Why the kernel would refuse ``value`` as an interface name, or None.

    A name the kernel gave in bytes that are not UTF-8 is a str with
    surrogate escapes (os.fsdecode): it is measured in those bytes.
    """
    if not value:
        return "is empty"
    try:
        size = len(os.fsencode(value))
    except UnicodeError:  # a lone surrogate no kernel name decodes to
        return "is not a valid interface name"
    if size > IFNAME_MAX:
        return f"is longer than {IFNAME_MAX} bytes"
    if value in (".", "..") or any(c in value for c in "/:\0") or any(c.isspace() for c in value):
        return "is not a valid interface name"
    return None


def mac_problem(value: str) -> str | None:
    """Why ``value`` is not a unicast MAC address a guest can have, or None."""
    if not _MAC.match(value):
        return "is not a MAC address like 52:54:00:12:34:56"
    if int(value[:2], 16) & 1:
        return "is a multicast address"
    if int(value.replace(":", ""), 16) == 0:
        return "is the all-zero address"
    return None


def pci_problem(value: str) -> str | None:
    """Why ``value`` is not a PCI address, or None."""
    return None if _PCI.match(value) else "is not a PCI address like 0000:03:00.0"


def load(path: str) -> Config:
    """Read and validate ``path``; raise ConfigError listing every problem."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from exc
    return _Validator(path).config(data)


class _Validator:
    """Walks the parsed TOML once, collecting problems instead of stopping."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []

    def problem(self, where: str, key: str | None, text: str) -> None:
        place = f"{self.path}: {where}" if where else self.path
        self.problems.append(f"{place}: key '{key}': {text}" if key else f"{place}: {text}")

    # -- typed getters -------------------------------------------------------

    def _get(self, table: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...],
             kind_name: str, required: bool) -> Any:
        if key not in table:
            if required:
                self.problem(where, key, "is required")
            return None
        value = table[key]
        # bool is an int in Python; TOML keeps them apart, and so do we.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            self.problem(where, key, f"must be {kind_name}, not a boolean")
            return None
        if not isinstance(value, kind):
            self.problem(where, key, f"must be {kind_name}, not {_toml_type(value)}")
            return None
        return value

    def string(self, table: Mapping[str, Any], key: str, where: str, required: bool = False) -> str | None:
        value = self._get(table, key, where, str, "a string", required)
        return value if isinstance(value, str) else None

    def choice(self, table: Mapping[str, Any], key: str, where: str, choices: tuple[str, ...],
               default: str | None, required: bool = False) -> str | None:
        value = self.string(table, key, where, required)
        if value is None:
            return default if key not in table else None
        if value not in choices:
            self.problem(where, key, f"'{value}' is not one of {', '.join(choices)}")
            return None
        return value

    def unknown_keys(self, table: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
        for key in table:
            if key not in known:
                self.problem(where, key, "is not a known key")

    # -- sections -------------------------------------------------------------

    def config(self, data: dict[str, Any]) -> Config:
        self.unknown_keys(data, ("netwatch", "vm"), "")
        settings = self.settings(data.get("netwatch", {}))
        vms_raw = data.get("vm", [])
        vms: list[VmConfig] = []
        if not isinstance(vms_raw, list) or not all(isinstance(v, dict) for v in vms_raw):
            self.problem("", "vm", "must be an array of tables ([[vm]])")
            vms_raw = []
        seen_vms: set[str] = set()
        seen_qmp: set[str] = set()
        seen_ifnames: dict[str, str] = {}
        for index, vm_raw in enumerate(vms_raw):
            vm = self.vm(vm_raw, index, seen_ifnames)
            if vm is None:
                continue
            if vm.name in seen_vms:
                self.problem(f"vm '{vm.name}'", "name", "is used by another VM")
            if vm.qmp is not None and vm.qmp in seen_qmp:
                self.problem(f"vm '{vm.name}'", "qmp", f"'{vm.qmp}' is used by another VM")
            seen_vms.add(vm.name)
            if vm.qmp is not None:
                seen_qmp.add(vm.qmp)
            vms.append(vm)
        if self.problems:
            raise ConfigError(self.problems)
        assert settings is not None
        return Config(path=self.path, settings=settings, vms=tuple(vms))

    def settings(self, raw: Any) -> Settings | None:
        where = "[netwatch]"
        if not isinstance(raw, dict):
            self.problem("", "netwatch", "must be a table")
            return None
        self.unknown_keys(raw, ("state_dir", "hooks_dir", "udev", "hook_timeout", "qmp_timeout", "unplug_timeout",
                                "migration_handover", "control_group", "metrics_file",
                                "netlink_rcvbuf", "device_dir"), where)
        defaults = Settings()
        values: dict[str, Any] = {}
        rcvbuf = self._get(raw, "netlink_rcvbuf", where, int, "a number of bytes", False)
        if rcvbuf is not None and not 4096 <= rcvbuf <= 1 << 30:
            self.problem(where, "netlink_rcvbuf", f"{rcvbuf} is not between 4096 and 1073741824 bytes")
        elif rcvbuf is not None:
            values["netlink_rcvbuf"] = rcvbuf
        group = self.string(raw, "control_group", where)
        if group is not None:
            try:
                grp.getgrnam(group)
                values["control_group"] = group
            except KeyError:
                self.problem(where, "control_group", f"there is no group named '{group}'")
        for key in ("state_dir", "hooks_dir", "device_dir"):
            path = self.string(raw, key, where)
            if path is not None and not os.path.isabs(path):
                self.problem(where, key, f"'{path}' must be an absolute path")
            elif path is not None:
                values[key] = path
        udev = self.choice(raw, "udev", where, UDEV_MODES, defaults.udev)
        if udev is not None:
            values["udev"] = udev
        for key in ("hook_timeout", "qmp_timeout", "unplug_timeout"):
            number = self._get(raw, key, where, (int, float), "a number of seconds", False)
            if number is None:
                continue
            if not 0 < number <= 3600:
                self.problem(where, key, f"{number} is not between 0 and 3600 seconds")
            else:
                values[key] = float(number)
        metrics = self.string(raw, "metrics_file", where)
        if metrics is not None and not os.path.isabs(metrics):
            self.problem(where, "metrics_file", f"'{metrics}' must be an absolute path")
        elif metrics is not None and not metrics.endswith(".prom"):
            self.problem(where, "metrics_file", f"'{metrics}' must end in .prom (node_exporter reads only those)")
        elif metrics is not None:
            values["metrics_file"] = metrics
        handover = self._get(raw, "migration_handover", where, (int, float), "a number of seconds", False)
        if handover is not None and not 0 <= handover <= 60:
            self.problem(where, "migration_handover", f"{handover} is not between 0 and 60 seconds")
        elif handover is not None:
            values["migration_handover"] = float(handover)
        return Settings(**values)

    def vm(self, raw: dict[str, Any], index: int, seen_ifnames: dict[str, str]) -> VmConfig | None:
        count = len(self.problems)
        name = self.string(raw, "name", f"vm #{index + 1}", required=True)
        where = f"vm '{name}'" if name else f"vm #{index + 1}"
        self.unknown_keys(raw, ("name", "qmp", "nic", "uuid", "qemu_user", "cgroup", "libvirt_domain", "machine",
                                "spare_ports"), where)
        if name is not None and (len(name) > VM_NAME_MAX or not _VM_NAME.match(name)):
            self.problem(where, "name", f"'{name}' must be 1-{VM_NAME_MAX} of A-Z a-z 0-9 . _ -,"
                         " starting with a letter or digit")
        qmp = self.string(raw, "qmp", where)
        if qmp is not None and not os.path.isabs(qmp):
            self.problem(where, "qmp", f"'{qmp}' must be an absolute path")
        nics_raw = raw.get("nic", [])
        if not isinstance(nics_raw, list) or not all(isinstance(n, dict) for n in nics_raw):
            self.problem(where, "nic", "must be an array of tables ([[vm.nic]])")
            nics_raw = []
        nics: list[NicConfig] = []
        seen_ids: set[str] = set()
        seen_hubs: dict[int, str] = {}
        for nic_index, nic_raw in enumerate(nics_raw):
            nic = self.nic(nic_raw, nic_index, name or f"#{index + 1}", where)
            if nic is None:
                continue
            nic_where = f"{where} nic '{nic.id}'"
            if nic.id in seen_ids:
                self.problem(nic_where, "id", "is used by another NIC of this VM")
            if nic.hub in seen_hubs:
                self.problem(nic_where, "hub", f"{nic.hub} is used by NIC '{seen_hubs[nic.hub]}' too")
            owner = f"{name}/{nic.id}"
            for backend_name in nic.backend_names:
                if backend_name in seen_ifnames:
                    self.problem(nic_where, "ifname", f"'{backend_name}' is used by {seen_ifnames[backend_name]} too")
                seen_ifnames.setdefault(backend_name, owner)
            # The macvlan's names come from ifname: changing it is the fix.
            for macvlan_name in nic.macvlan_names:
                if macvlan_name in seen_ifnames:
                    self.problem(nic_where, "ifname", f"its macvlan's name '{macvlan_name}' is used by "
                                 f"{seen_ifnames[macvlan_name]} too")
                seen_ifnames.setdefault(macvlan_name, f"{owner}'s macvlan")
            seen_ids.add(nic.id)
            seen_hubs.setdefault(nic.hub, nic.id)
            nics.append(nic)
        nics = self.guest_slots(nics, where)
        machine = self.choice(raw, "machine", where, MACHINES, "pc")
        spare = self._get(raw, "spare_ports", where, int, "a number of ports", False)
        if spare is not None and machine != "q35":
            self.problem(where, "spare_ports", "is only for machine = \"q35\" (pc's root bus hotplugs)")
        elif spare is not None and not 0 <= spare <= len(DEFAULT_GUEST_SLOTS):
            self.problem(where, "spare_ports", f"{spare} is not between 0 and {len(DEFAULT_GUEST_SLOTS)}")
        if spare is None:
            spare = DEFAULT_SPARE_PORTS if machine == "q35" else 0
        uuid = self.string(raw, "uuid", where)
        if uuid is not None and not _UUID.match(uuid):
            self.problem(where, "uuid", f"'{uuid}' is not a UUID like 6f1a2b3c-0d4e-4f5a-8b6c-7d8e9f0a1b2c")
        qemu_user = self.string(raw, "qemu_user", where)
        if qemu_user is not None:
            try:
                pwd.getpwnam(qemu_user)
            except KeyError:
                self.problem(where, "qemu_user", f"there is no user named '{qemu_user}'")
        cgroup = self.string(raw, "cgroup", where)
        if cgroup is not None and not cgroup.startswith("/"):
            self.problem(where, "cgroup", f"'{cgroup}' must be a cgroup path (a glob) starting with /")
        libvirt_domain = self.string(raw, "libvirt_domain", where)
        if libvirt_domain is not None and libvirt_machine_name(1, libvirt_domain) == "qemu-1":
            self.problem(where, "libvirt_domain", f"'{libvirt_domain}' has no letter or digit, which "
                         "libvirt's machine name is made of")
        if qmp is None and not nics_raw:
            self.problem(where, "qmp", "is required (only a VM whose NICs are all wiring = \"redirect\" can do "
                         "without netwatch's monitor, and this one has none)")
        elif qmp is None and any(nic.wiring != "redirect" for nic in nics):
            # Only a redirect NIC works with no monitor: QEMU opens its tap by name; the others need fds and QMP.
            wired = ", ".join(sorted({f"{nic.id} ({nic.wiring})" for nic in nics if nic.wiring != "redirect"}))
            self.problem(where, "qmp", f"is required: NIC {wired} needs netwatch's monitor "
                         "(only a VM whose NICs are all wiring = \"redirect\" can do without)")
        if len(self.problems) != count or name is None:
            return None
        assert machine is not None
        return VmConfig(name=name, qmp=qmp, nics=tuple(nics), uuid=uuid.lower() if uuid else None,
                        qemu_user=qemu_user, cgroup=cgroup, machine=machine, spare_ports=spare,
                        libvirt_domain=libvirt_domain)

    def guest_slots(self, nics: list[NicConfig], where: str) -> list[NicConfig]:
        """Give every NIC without guest_pci a default slot; refuse two NICs on one slot."""
        taken: dict[GuestPci, str] = {}
        for nic in nics:
            if nic.guest_pci is None:
                continue
            if nic.guest_pci in taken:
                self.problem(f"{where} nic '{nic.id}'", "guest_pci",
                             f"{nic.guest_pci} is used by NIC '{taken[nic.guest_pci]}' too")
            taken.setdefault(nic.guest_pci, nic.id)
        placed, short = assign_slots(nics, {})
        for nic_id in short:
            self.problem(f"{where} nic '{nic_id}'", "guest_pci",
                         f"is required: the {len(DEFAULT_GUEST_SLOTS)} default slots are taken")
        return placed

    def nic(self, raw: dict[str, Any], index: int, vm_name: str, vm_where: str) -> NicConfig | None:
        count = len(self.problems)
        nic_id = self.string(raw, "id", f"{vm_where} nic #{index + 1}", required=True)
        where = f"{vm_where} nic '{nic_id}'" if nic_id else f"{vm_where} nic #{index + 1}"
        self.unknown_keys(raw, ("id", "backend", "lower", "mode", "mac", "hub", "model", "bridge", "ifname",
                                "guest_pci", "wiring", "queues"), where)
        if nic_id is not None and (len(nic_id) > NIC_ID_MAX or not _QEMU_ID.match(nic_id)):
            self.problem(where, "id", f"'{nic_id}' is not a QEMU id: 1-{NIC_ID_MAX} of A-Z a-z 0-9 . _ -,"
                         " starting with a letter")
        elif nic_id is not None and _RESERVED_SUFFIX.search(nic_id):
            self.problem(where, "id", f"'{nic_id}' ends like a netwatch backend id (-tapN, -upN, -fdN)")
        backend = self.choice(raw, "backend", where, BACKENDS, None, required=True)
        modes = TAP_MODES if backend == "tap" else MACVTAP_MODES
        mode = self.choice(raw, "mode", where, modes, modes[0])
        mac = self.string(raw, "mac", where, required=True)
        if mac is not None:
            self.check_mac(mac, where, "mac")
        hub = self._get(raw, "hub", where, int, "an integer", False)
        if hub is None and "hub" not in raw:
            hub = index
        elif hub is not None and not 0 <= hub <= 2**31 - 1:
            self.problem(where, "hub", f"{hub} must be between 0 and 2147483647")
        model = self.string(raw, "model", where) or ("virtio-net-pci" if "model" not in raw else None)
        if model is not None and not _QEMU_ID.match(model):
            self.problem(where, "model", f"'{model}' is not a QEMU device model name")
        ifname = self.string(raw, "ifname", where)
        if ifname is not None:
            self.check_ifname(ifname, where, "ifname")
        lower = self.lower(raw, where)
        guest_pci = self.guest_pci(raw, where)
        bridge = self.string(raw, "bridge", where)
        if bridge is not None:
            self.check_ifname(bridge, where, "bridge")
        if backend == "macvtap":
            if lower is None and "lower" not in raw:
                self.problem(where, "lower", "is required for a macvtap NIC")
            if "bridge" in raw:
                self.problem(where, "bridge", "is only for tap NICs in bridged mode")
        elif backend == "tap":
            if mode == "bridged" and bridge is None and "bridge" not in raw:
                self.problem(where, "bridge", "is required for a tap NIC in bridged mode")
            if mode == "routed" and "bridge" in raw:
                self.problem(where, "bridge", "is only for tap NICs in bridged mode")
        wiring = self.choice(raw, "wiring", where, WIRINGS, default_wiring(backend or "macvtap"))
        if wiring == "redirect" and backend == "tap":
            # A tap's fd outlives its bridge and uplink: there is no macvlan to remake.
            self.problem(where, "wiring", "\"redirect\" is only for macvtap NICs (a tap NIC's own tap never "
                         "dies with its lower: use \"direct\")")
        queues = self._get(raw, "queues", where, int, "a number of queues", False)
        if queues is not None and not 1 <= queues <= MAX_QUEUES:
            self.problem(where, "queues", f"{queues} is not between 1 and {MAX_QUEUES}")
        elif queues is not None and queues > 1 and wiring == "hub":
            self.problem(where, "queues", "needs wiring = \"direct\" or \"redirect\": a NIC wired through a hub "
                         "has one queue (the hubport's)")
        elif queues is not None and queues > 1 and model is not None and not model.startswith("virtio-net"):
            self.problem(where, "queues", f"needs a virtio-net model: {model} has one queue")
        if len(self.problems) != count:
            return None
        assert nic_id and backend and mode and mac and model is not None and isinstance(hub, int) and wiring
        return NicConfig(id=nic_id, backend=backend, mac=mac.lower(), hub=hub, model=model,
                         ifname=ifname or derived_ifname(vm_name, nic_id), lower=lower, mode=mode,
                         bridge=bridge, guest_pci=guest_pci, guest_pci_set=guest_pci is not None, wiring=wiring,
                         queues=queues or 1)

    def guest_pci(self, raw: dict[str, Any], where: str) -> GuestPci | None:
        if "guest_pci" not in raw:
            return None
        value = raw["guest_pci"]
        if isinstance(value, int) and not isinstance(value, bool):
            bus, slot = None, value
        elif isinstance(value, str) and (match := _GUEST_PCI.match(value)):
            bus, slot = match.group("bus"), int(match.group("slot"), 16)
        else:
            self.problem(where, "guest_pci", f"{value!r} is not a PCI slot like \"0x19\" or \"pci.1:0x03\"")
            return None
        lowest = 0 if bus is not None else 1  # slot 0 of the root bus is the host bridge
        if not lowest <= slot <= 0x1F:
            self.problem(where, "guest_pci", f"slot {slot:#x} is not between {lowest:#04x} and 0x1f"
                         + ("" if bus else " on the root bus"))
            return None
        return GuestPci(slot=slot, bus=bus)

    def lower(self, raw: dict[str, Any], where: str) -> LowerSpec | None:
        if "lower" not in raw:
            return None
        value = raw["lower"]
        if isinstance(value, str):
            return LowerSpec(name=value) if self.check_ifname(value, where, "lower") else None
        if not isinstance(value, dict):
            self.problem(where, "lower", f"must be an interface name or a table, not {_toml_type(value)}")
            return None
        sub = f"{where} lower"
        self.unknown_keys(value, ("name", "mac", "pci"), sub)
        checks: dict[str, Callable[[str, str, str], bool]] = {
            "name": self.check_ifname, "mac": self.check_mac, "pci": self.check_pci}
        found: dict[str, str] = {}
        ok = True
        for key, check in checks.items():
            item = self.string(value, key, sub)
            if item is None:
                ok = ok and key not in value
            elif check(item, sub, key):
                found[key] = _normalise(key, item)
            else:
                ok = False
        if ok and not found:
            self.problem(where, "lower", "needs at least one of name, mac, pci")
            return None
        return LowerSpec(**found) if ok else None

    # -- value checks: return True when fine, else record the problem -------

    def check_ifname(self, value: str, where: str, key: str) -> bool:
        why = ifname_problem(value)
        if why:
            self.problem(where, key, f"'{value}' {why}")
        return why is None

    def check_mac(self, value: str, where: str, key: str) -> bool:
        why = mac_problem(value)
        if why:
            self.problem(where, key, f"'{value}' {why}")
        return why is None

    def check_pci(self, value: str, where: str, key: str) -> bool:
        why = pci_problem(value)
        if why:
            self.problem(where, key, f"'{value}' {why}")
        return why is None


def _normalise(key: str, value: str) -> str:
    if key == "mac":
        return value.lower()
    if key == "pci":
        # sysfs always names the PCI domain.
        return value.lower() if value.count(":") == 2 else f"0000:{value.lower()}"
    return value


def _toml_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    return next((text for kind, text in names.items() if isinstance(value, kind)), type(value).__name__)
