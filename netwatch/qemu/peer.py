"""Who is at the other end of a VM's QMP socket: netwatch hands that peer
file descriptors carrying the VM's traffic, so it must provably be that
VM's QEMU.

A QEMU (which a guest may own) or another local process can bind a socket
at a VM's path; under libvirt every QEMU runs as the same user with its
sockets in one directory, so neither the uid nor the directory tells one
VM's QEMU from another's. What a peer cannot forge: its pid (SO_PEERCRED),
its cgroup, and whether the QEMU recorded for the VM still runs. The checks
here use those, in this order, before anything of the VM's is touched:

1. the socket and every directory above it can be replaced only by root
   or the VM's QEMU user (a sticky directory counts when the entry below
   it is theirs);
2. the peer runs as the VM's ``qemu_user`` when it names one, else as root
   or the owner of the socket's directory;
3. the peer's cgroup matches ``cgroup`` when the VM sets it (libvirt and
   systemd give every VM a scope of its own), and is the scope libvirt
   makes for the domain named ``libvirt_domain`` when it sets that;
4. the peer's process is no other VM's: none was admitted as its peer and
   none has it in its runtime records, for as long as it runs (a QEMU
   that closes one VM's socket and binds another's is still the first's);
5. the QEMU that served the VM before (this run's, or the runtime records')
   no longer runs, unless it is this peer;
6. ``query-uuid`` answers the VM's ``uuid`` when it sets one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fnmatch
import os
import pwd
import re
import stat
import string
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int


@dataclass(frozen=True)
class Identity:
    """What a VM's config says of its QEMU (each optional)."""

    uuid: str | None = None
    qemu_user: str | None = None
    cgroup: str | None = None
    libvirt_domain: str | None = None


def trusted_uids(path: str, identity: Identity) -> set[int]:
    """root, and the VM's QEMU user: ``qemu_user``, else whoever owns the socket's directory."""
    uids = {0}
    if identity.qemu_user is not None:
        # Checked when the config was loaded; a user removed since makes nobody more trusted.
        with contextlib.suppress(KeyError):
            uids.add(pwd.getpwnam(identity.qemu_user).pw_uid)
    else:
        with contextlib.suppress(OSError):
            uids.add(os.stat(os.path.dirname(path)).st_uid)
    return uids


def peer_uids(identity: Identity, trusted: set[int]) -> set[int]:
    """Who the peer may run as: exactly ``qemu_user`` when the VM names one, else any trusted uid."""
    if identity.qemu_user is None:
        return trusted
    try:
        return {pwd.getpwnam(identity.qemu_user).pw_uid}
    except KeyError:
        return set()


def path_problem(path: str, uids: set[int]) -> str | None:
    """Why someone other than ``uids`` could have put the socket at ``path``, or None."""
    try:
        sock = os.lstat(path)
    except OSError as exc:
        return f"cannot inspect {path}: {exc.strerror or exc}"
    if not stat.S_ISSOCK(sock.st_mode):
        return f"{path} is not a socket"
    if sock.st_uid not in uids:
        return f"{path} belongs to uid {sock.st_uid}, not root or the VM's QEMU user"
    child_owner = sock.st_uid
    directory = Path(path).parent
    while True:
        try:
            info = os.lstat(directory)
        except OSError as exc:
            return f"cannot inspect {directory}: {exc.strerror or exc}"
        if not stat.S_ISDIR(info.st_mode):
            return f"{directory} is not a directory"
        if info.st_uid not in uids:
            return f"{directory} belongs to uid {info.st_uid}, not root or the VM's QEMU user"
        # Group-writable counts as others-writable: netwatch cannot know the group's members.
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (info.st_mode & stat.S_ISVTX
                                                                 and child_owner in uids):
            return f"{directory} is writable by others than root and the VM's QEMU user"
        if directory.parent == directory:
            return None
        child_owner = info.st_uid
        directory = directory.parent


class _StatxTime(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_int64), ("nsec", ctypes.c_uint32), ("_reserved", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    # struct statx (linux/stat.h), 256 bytes.
    _fields_ = [("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32), ("attributes", ctypes.c_uint64),
                ("nlink", ctypes.c_uint32), ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32),
                ("mode", ctypes.c_uint16), ("_spare0", ctypes.c_uint16), ("ino", ctypes.c_uint64),
                ("size", ctypes.c_uint64), ("blocks", ctypes.c_uint64), ("attributes_mask", ctypes.c_uint64),
                ("atime", _StatxTime), ("btime", _StatxTime), ("ctime", _StatxTime), ("mtime", _StatxTime),
                ("rdev_major", ctypes.c_uint32), ("rdev_minor", ctypes.c_uint32),
                ("dev_major", ctypes.c_uint32), ("dev_minor", ctypes.c_uint32), ("_spare", ctypes.c_uint64 * 14)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_AT_FDCWD, _AT_SYMLINK_NOFOLLOW, _STATX_INO, _STATX_BTIME = -100, 0x100, 0x100, 0x800


def file_id(path: str) -> tuple[int, int, int] | None:
    """Which file is at ``path`` (not followed), or None: a socket bound anew is another file, a touched one is not.

    Device, inode and birth time: ext4 gives a new file the inode number
    of the one just removed, so the inode alone cannot tell a QEMU's new
    socket from its old one. Where the birth time is unknown it is 0 (a
    new socket with a reused inode then waits out the delay).
    """
    buf = _Statx()
    if _libc.statx(_AT_FDCWD, os.fsencode(path), _AT_SYMLINK_NOFOLLOW, _STATX_INO | _STATX_BTIME,
                   ctypes.byref(buf)) != 0:
        return None
    born = buf.btime.sec * 1_000_000_000 + buf.btime.nsec if buf.mask & _STATX_BTIME else 0
    return os.makedev(buf.dev_major, buf.dev_minor), buf.ino, born


def cgroup_of(pid: int) -> str | None:
    """The process's cgroup path (the unified hierarchy's, else systemd's named one)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    unified = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    named = next((line.split(":", 2)[2] for line in lines if ":name=systemd:" in line), None)
    return unified if unified not in (None, "/") else named or unified


def cgroup_problem(pid: int, pattern: str) -> str | None:
    group = cgroup_of(pid)
    if group is None:
        return f"cannot read the cgroup of pid {pid}"
    if not fnmatch.fnmatchcase(group, pattern):
        return f"its cgroup {group} does not match '{pattern}'"
    return None


# The cgroup libvirt gives a domain's QEMU: under systemd the scope of its
# machine ("machine-" + the machine name, systemd-escaped, + ".scope"),
# without systemd its own group in libvirt's "machine" partition.
_LIBVIRT_SCOPE = re.compile(r"/machine\.slice/machine-qemu\\x2d(\d+)\\x2d[^/]*\.scope(?:/|\Z)")
_LIBVIRT_GROUP = re.compile(r"/machine/qemu-(\d+)-[^/]*\.libvirt-qemu(?:/|\Z)")
_HOSTNAME_CHARS = frozenset(string.ascii_letters + string.digits)


def libvirt_machine_name(domain_id: int, domain: str) -> str:
    """The machine name libvirt (system instance) gives domain ``domain`` started with id ``domain_id``.

    libvirt's virDomainDriverGenerateMachineName: "qemu-ID-" and the name
    with only letters, digits, and single "-" or "." between them kept, cut
    at 64 characters, with no "-" or "." at the end.
    """
    name = f"qemu-{domain_id}-"
    skip = True
    for char in domain:
        if len(name) >= 64:
            break
        if char in ".-":
            if not skip:
                name += char
                skip = True
        elif char in _HOSTNAME_CHARS:
            name += char
            skip = False
    return name.rstrip("-.")


def libvirt_cgroups(domain_id: int, domain: str) -> tuple[str, str]:
    """The cgroup of domain ``domain`` with id ``domain_id``: under systemd, and under libvirt alone."""
    machine = libvirt_machine_name(domain_id, domain)
    # systemd's unit name escaping: of the characters libvirt keeps, only "-" is escaped.
    unit = machine.replace("-", "\\x2d")
    return f"/machine.slice/machine-{unit}.scope", f"/machine/{machine}.libvirt-qemu"


def libvirt_problem(pid: int, domain: str) -> str | None:
    """Why the process is not in the cgroup libvirt makes for ``domain``, or None.

    Exact, unlike a glob: "machine-qemu*web1.scope" also matches the scope
    of "staging-web1" and of "notweb1". The domain id in the path is taken
    from it (it changes at every start); the rest must be what libvirt
    derives from the name. Only the top of the path (/machine.slice,
    /machine) is compared: a user given a cgroup subtree of their own can
    name a group anything below it.
    """
    group = cgroup_of(pid)
    if group is None:
        return f"cannot read the cgroup of pid {pid}"
    for pattern, index in ((_LIBVIRT_SCOPE, 0), (_LIBVIRT_GROUP, 1)):
        match = pattern.match(group)
        if match is not None:
            expected = libvirt_cgroups(int(match.group(1)), domain)[index]
            if group == expected or group.startswith(expected + "/"):
                return None
    return f"its cgroup {group} is not libvirt's for domain '{domain}'"


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, it names one process for good."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = stat_line[stat_line.rfind(")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def still_runs(pid: int, started: int | None) -> bool:
    """Whether the process recorded as (``pid``, ``started``) is still there (not a reuse of its pid)."""
    now = start_time(pid)
    if now is None:
        return False
    if started is not None:
        return now == started
    # A record without a start time (older netwatch): a QEMU binary is taken for the same QEMU.
    try:
        return "qemu" in os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return False


class QemuClaims:
    """Which VM each running QEMU process is: shared by every VM's session, for the life of the service.

    A process is claimed for a VM when it is admitted as the VM's QMP peer
    or is named by the VM's runtime records; the claim lasts while the
    process runs, whether or not a session to it is open, so a QEMU that
    closes one VM's socket and binds another's is still the first VM's.
    A claim names the process by pid and start time: a reused pid
    inherits nothing.
    """

    def __init__(self) -> None:
        # pid -> (start time, VMs claiming it: more than one only from records that disagree).
        self._claims: dict[int, tuple[int, set[str]]] = {}
        self._sweep_at = 64

    def claim(self, pid: int, vm: str) -> None:
        """``pid`` (as it runs now) is ``vm``'s QEMU."""
        started = start_time(pid)
        if started is None:
            return  # gone already
        held = self._claims.get(pid)
        if held is None or held[0] != started:
            self._claims[pid] = (started, {vm})
        else:
            held[1].add(vm)
        if len(self._claims) >= self._sweep_at:
            # Claims of exited QEMUs are dropped when their pid is asked
            # about; these are the rest, so the dict stays the size of the host.
            for other in list(self._claims):
                self.owners(other)
            self._sweep_at = max(64, 2 * len(self._claims))

    def recorded(self, pid: int, started: int | None, vm: str) -> None:
        """A runtime record says (``pid``, ``started``) served ``vm``: claim it if that process still runs."""
        if still_runs(pid, started):
            self.claim(pid, vm)

    def owners(self, pid: int) -> frozenset[str]:
        """The VMs that claim the process running as ``pid`` (none once it has exited)."""
        held = self._claims.get(pid)
        if held is None:
            return frozenset()
        if start_time(pid) != held[0]:
            del self._claims[pid]  # exited (perhaps its pid is another process's now)
            return frozenset()
        return frozenset(held[1])

    def other_than(self, pid: int, vm: str) -> str | None:
        """A VM other than ``vm`` that claims ``pid``, or None."""
        return min(self.owners(pid) - {vm}, default=None)


@dataclass(frozen=True)
class Claims:
    """What else says which QEMU serves a VM: one QEMU serves one VM, and a VM has one QEMU."""

    vm_name: str
    # Every VM's claimed QEMU processes (admitted peers and records), for as long as they run.
    admitted: QemuClaims
    # The QEMU that served this VM last, and whether it still runs.
    served_pid: int | None
    served_alive: bool
    # (pid, start time) of the QEMUs the runtime records say served this VM.
    recorded: list[tuple[int, int | None]]


def peer_problem(peer: Peer | None, path: str, identity: Identity, claims: Claims) -> str | None:
    """Why ``peer`` on ``path`` is not provably the VM's QEMU, or None (the UUID is asked apart, over QMP)."""
    if peer is None:
        return "cannot tell which process it is"
    uids = trusted_uids(path, identity)
    problem = path_problem(path, uids)
    if problem is not None:
        return problem
    if peer.uid not in peer_uids(identity, uids):
        who = identity.qemu_user or "root or the VM's QEMU user"
        return f"it runs as uid {peer.uid}, not as {who}"
    if identity.cgroup is not None and (problem := cgroup_problem(peer.pid, identity.cgroup)):
        return problem
    if identity.libvirt_domain is not None and (problem := libvirt_problem(peer.pid, identity.libvirt_domain)):
        return problem
    other = claims.admitted.other_than(peer.pid, claims.vm_name)
    if other is not None:
        return f"pid {peer.pid} is the QEMU of VM '{other}'"
    if claims.served_pid is not None and claims.served_pid != peer.pid and claims.served_alive:
        return f"the QEMU that served this VM (pid {claims.served_pid}) still runs"
    for pid, started in claims.recorded:
        if pid != peer.pid and still_runs(pid, started):
            return f"the QEMU recorded for this VM (pid {pid}) still runs"
    return None
