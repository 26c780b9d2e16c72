"""libvirt's qemu hook, passed on to the running service.

libvirt runs every executable in /etc/libvirt/hooks/qemu.d/ (libvirt 6.5
and later) as root, synchronously, at each step of a domain's life:
``<domain> <op> <subop> <extra>`` with the domain's XML on stdin
(https://libvirt.org/hooks.html). netwatch ships one (conf/libvirt/) that
runs ``netwatch libvirt-hook "$@"``: this module. It reads what libvirt
gives (the domain's name and UUID from the XML, QEMU's pid from libvirt's
pid file once QEMU runs) and sends it over the control socket, which takes
it from root only. The service then follows the domain with the VMs whose
``libvirt_domain`` names it (netwatch/qemu/unmonitored.py).

libvirt waits for its hooks, and a hook that calls back into libvirt
deadlocks it: this never does, every wait has a bound, and it exits 0 even
when netwatch is not there, so no domain fails to start or stop because of
netwatch. At ``prepare`` it waits (at most PREPARE_WAIT s) for netwatch to
say the domain's taps are there: QEMU opens them right after.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from typing import Any
from xml.etree import ElementTree

from netwatch.errors import BadRequest, NetwatchError
from netwatch.qemu.unmonitored import HOOK_OPS, RUNNING_OPS, LibvirtEvent
from netwatch.service import control
from netwatch.untrusted import clean

# Where libvirt (the system instance) keeps a running domain's state; the hook runs in libvirtd's mount namespace.
LIBVIRT_QEMU_RUN = "/run/libvirt/qemu"
PREPARE_WAIT = 10.0
OTHER_WAIT = 5.0
MAX_XML = 4 * 1024 * 1024
# libvirt refuses "/" in a domain name; the rest is checked as it is used (a file name, a journal field).
_DOMAIN = re.compile(r"[^/\x00-\x1f]{1,256}\Z")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
SUBOPS = ("begin", "end", "-")


def event_from_request(request: dict[str, Any]) -> LibvirtEvent:
    """The control request's event, validated once here (the service's edge)."""
    domain, op, subop = (request.get(key) for key in ("domain", "op", "subop"))
    if not isinstance(domain, str) or not _DOMAIN.match(domain):
        raise BadRequest("libvirt-hook needs a domain name")
    if op not in HOOK_OPS or subop not in SUBOPS:
        raise BadRequest(f"libvirt-hook: unknown operation {clean(str(op), 20)} {clean(str(subop), 20)}")
    uuid, pid, migration = request.get("uuid"), request.get("pid"), request.get("migration")
    if uuid is not None and not (isinstance(uuid, str) and _UUID.match(uuid)):
        raise BadRequest("libvirt-hook: 'uuid' is not a UUID")
    if pid is not None and not (isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2 ** 22 + 1):
        raise BadRequest("libvirt-hook: 'pid' is not a process id")
    if migration not in (None, "in", "out"):
        raise BadRequest("libvirt-hook: 'migration' is not \"in\" or \"out\"")
    assert isinstance(op, str) and isinstance(subop, str)
    return LibvirtEvent(domain=domain, op=op, subop=subop, uuid=uuid.lower() if uuid else None, pid=pid,
                        migration=migration)


def _domain_xml(data: bytes) -> tuple[str | None, str | None]:
    """The (name, uuid) in libvirt's domain XML; (None, None) if it has none."""
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError:
        return None, None
    return root.findtext("name"), root.findtext("uuid")


def _pid_file(domain: str, run_dir: str = LIBVIRT_QEMU_RUN) -> int | None:
    """QEMU's pid from libvirt's pid file (root's, a regular file, read without following a link)."""
    data = _root_file(os.path.join(run_dir, f"{domain}.pid"), 32)
    text = data.decode("ascii", "replace").strip() if data is not None else ""
    return int(text) if text.isdigit() and int(text) > 0 else None


def _root_file(path: str, limit: int) -> bytes | None:
    """A file of libvirt's: root's, regular, opened without following a link; at most ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != 0:
            return None
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _migration_job(domain: str, run_dir: str = LIBVIRT_QEMU_RUN) -> str | None:
    """The migration libvirt's status file says the domain was in when it stopped: "out" (the guest went
    to another host), "in" (it was coming here, and did not arrive), or None.

    libvirt writes its async job into the status file, which is still there at ``stopped end``
    (seen with libvirt 9.0: ``<job ... async='migration out' phase='confirm3'>`` after a migration,
    ``async='migration in'`` on a target whose QEMU died receiving, ``paused``/``migration`` with
    ``async='none'`` on a target whose migration was aborted, ``running``/``shutdown`` with ``async='none'``
    after a destroy or shutdown, ``async='save'`` for managedsave).
    """
    data = _root_file(os.path.join(run_dir, f"{domain}.xml"), MAX_XML)
    if data is None:
        return None
    try:
        status = ElementTree.fromstring(data)
    except ElementTree.ParseError:
        return None
    job = status.find("job")
    kind = job.get("async") if job is not None else None
    if kind in ("migration out", "migration in"):
        return "out" if kind == "migration out" else "in"
    # A target whose incoming migration was aborted: libvirt's destroy job replaced the migration's, and
    # the domain never left the paused state it arrived in (a migrated source says "migration out" above).
    if (status.get("state"), status.get("reason")) == ("paused", "migration"):
        return "in"
    return None


def run_hook(state_dir: str, argv: list[str], stdin: bytes, run_dir: str = LIBVIRT_QEMU_RUN) -> str | None:
    """Pass one hook call on to netwatch; a line for libvirt's log when something is amiss, else None."""
    if len(argv) < 3:
        return "netwatch libvirt-hook: expected DOMAIN OPERATION SUB-OPERATION [EXTRA] (as libvirt calls it)"
    domain, op, subop = argv[:3]
    if op not in HOOK_OPS:
        return None  # not one netwatch follows
    name, uuid = _domain_xml(stdin[:MAX_XML])
    if name is not None and name != domain:
        return f"netwatch libvirt-hook: the XML names domain {clean(name, 80)}, not {clean(domain, 80)}: ignored"
    request: dict[str, Any] = {"domain": domain, "op": op, "subop": subop}
    if uuid:
        request["uuid"] = uuid
    if op in RUNNING_OPS and _DOMAIN.match(domain):
        request["pid"] = _pid_file(domain, run_dir)
    if op == "stopped" and _DOMAIN.match(domain):
        request["migration"] = _migration_job(domain, run_dir)
    timeout = PREPARE_WAIT if op == "prepare" else OTHER_WAIT
    try:
        result = control.request(state_dir, "libvirt-hook", timeout=timeout, **request)
    except NetwatchError as exc:
        # libvirt goes on: a tap netwatch made at its start is there all the same.
        return f"netwatch libvirt-hook: {domain} {op} {subop}: {exc}"
    problems = result.get("refused") if isinstance(result, dict) else None
    if problems:
        return f"netwatch libvirt-hook: {domain} {op} {subop}: " + "; ".join(clean(str(p), 300) for p in problems)
    return None


def main(state_dir: str, argv: list[str]) -> int:
    """Exit 0 whatever happens: a non-zero exit fails libvirt's start, and at ``reconnect`` (a libvirtd
    restart) kills the running domain. Nothing goes to stdout: at ``migrate`` and ``restore`` libvirt takes
    what a hook prints there for the domain's new XML."""
    try:
        data = sys.stdin.buffer.read(MAX_XML + 1) if not sys.stdin.isatty() else b""
        line = run_hook(state_dir, argv, data)
    except Exception as exc:  # noqa: BLE001 - one line for libvirt's log; libvirt goes on
        line = f"netwatch libvirt-hook: {type(exc).__name__}: {exc}"
    if line is not None:
        print(line, file=sys.stderr)
    return 0
