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
   systemd give every VM a scope of its own);
4. the peer serves no other VM;
5. the QEMU that served the VM before (this run's, or the runtime records')
   no longer runs, unless it is this peer;
6. ``query-uuid`` answers the VM's ``uuid`` when it sets one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import pwd
import stat
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


@dataclass(frozen=True)
class Claims:
    """What else says which QEMU serves a VM: one QEMU serves one VM, and a VM has one QEMU."""

    vm_name: str
    # pid -> VM name of every admitted peer, all VMs' sessions.
    admitted: dict[int, str]
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
    other = claims.admitted.get(peer.pid)
    if other is not None and other != claims.vm_name:
        return f"pid {peer.pid} is the QEMU of VM '{other}'"
    if claims.served_pid is not None and claims.served_pid != peer.pid and claims.served_alive:
        return f"the QEMU that served this VM (pid {claims.served_pid}) still runs"
    for pid, started in claims.recorded:
        if pid != peer.pid and still_runs(pid, started):
            return f"the QEMU recorded for this VM (pid {pid}) still runs"
    return None
