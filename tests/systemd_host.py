"""A real systemd as PID 1 for tests: a Debian 12 tree booted with systemd-nspawn.

These machines do not run systemd (PID 1 is something else), yet netwatch is
a systemd service: its unit's sandbox (DeviceAllow=, ProtectSystem=, the
system call filter, /run mounted nodev), Type=notify, the watchdog and the
journal only show their effect under a real service manager. So a minimal
bookworm tree (debootstrap, cached like the test guest in
``~/.cache/netwatch-systemd-host/<hash>``) is booted with ``systemd-nspawn
-b`` in its own network namespace, on a throwaway overlay of the cached
tree, and commands run inside with ``nsenter`` (machinectl and
``systemd-run -M`` need systemd on the host). Everything is removed on exit:
the container is powered off, its overlay unmounted and deleted.

The host mounts cgroups in the hybrid layout (v1 controllers, a v2 tree at
/sys/fs/cgroup/unified). Left alone, nspawn would give the container the v1
layout, where the devices controller is not delegated to it and the
container's systemd cannot enforce DeviceAllow=: the test would pass on a
unit that fails on a real host. SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 gives it
cgroup v2, where the device policy is a BPF program the container's systemd
attaches itself (hence ``--system-call-filter=bpf``);
``SystemdHost.device_policy_enforced`` checks that it really is.

Needs root, ``systemd-container`` (systemd-nspawn), ``debootstrap``,
``util-linux`` (nsenter) and a reachable Debian mirror (the one apt uses)
for the first build.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from netwatch.sandbox.testbed import Deadline, wait_until

CACHE = Path(os.environ.get("NETWATCH_SYSTEMD_HOST_CACHE", Path.home() / ".cache" / "netwatch-systemd-host"))
SUITE = "bookworm"
# What a Debian 12 KVM host running netwatch has, minus the kernel: systemd
# as init, python3-venv for docs/service.md's install, iproute2 for links and
# QEMU itself (it runs inside, under TCG). debootstrap installs Depends only,
# never Recommends.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "iproute2", "kmod",
            "qemu-system-x86", "procps")
# Units a bare container has no use for: a getty on the read-only console,
# apt's timers (no network inside).
MASKED = ("console-getty.service", "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
          "fstrim.timer")
RECIPE = 1  # bump when the build below changes in a way the package list does not show
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The host's cgroup hierarchies nspawn uses: the v2 one (the container's) and v1 name=systemd.
CGROUP_HIERARCHIES = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd")
NSPAWN_RUN = Path("/run/systemd/nspawn")
NEEDED_TOOLS = {"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap", "nsenter": "util-linux"}


class HostError(Exception):
    """The systemd host could not be built or booted; the message says why, in one sentence."""


def missing_tools() -> list[str]:
    """Debian packages to install for this environment (empty: all there)."""
    return sorted({package for tool, package in NEEDED_TOOLS.items() if shutil.which(tool) is None})


# -- the Debian tree -----------------------------------------------------------


def debian_mirror() -> tuple[str, str | None]:
    """The mirror (and its keyring, if named) that this host's apt uses for ``SUITE``.

    Read from apt's own sources at run time, so that the test fetches from
    wherever this machine is configured to, and names no host itself.
    """
    found: list[tuple[str, str | None]] = []
    sources = Path("/etc/apt")
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if ("deb" in fields.get("types", "").split() and SUITE in fields.get("suites", "").split()
                        and "main" in fields.get("components", "").split()
                        and fields.get("enabled", "yes").lower() != "no"):
                    found += [(uri, fields.get("signed-by")) for uri in fields.get("uris", "").split()]
        elif path.name == "sources.list" or path.suffix == ".list":
            for line in text.splitlines():
                match = re.match(r"\s*deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s+(.*)", line)
                if match and match.group(3) == SUITE and "main" in match.group(4).split():
                    keyring = re.search(r"signed-by=(\S+)", match.group(1) or "")
                    found.append((match.group(2), keyring.group(1) if keyring else None))
    if not found:
        raise HostError(f"no apt source for Debian {SUITE} main in /etc/apt/sources.list*: nothing to "
                        f"debootstrap from")
    return found[0]


def _apt_proxy() -> dict[str, str]:
    """apt's HTTP proxy, if it has one, for debootstrap (which does not read apt's config)."""
    try:
        out = subprocess.run(["apt-config", "shell", "P", "Acquire::http::Proxy"], capture_output=True,
                             text=True).stdout
    except OSError:
        return {}
    match = re.match(r"P='(.*)'", out.strip())
    return {"http_proxy": match.group(1)} if match and match.group(1) else {}


def _tree_key() -> str:
    recipe = "\n".join([SUITE, *PACKAGES, *MASKED, str(RECIPE)])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def build_tree(cache: Path = CACHE, progress: Callable[[str], None] = print) -> Path:
    """The bookworm tree, built on first use (a few minutes) and cached in ``cache``."""
    tree = cache / _tree_key()
    if (tree / "usr" / "lib" / "os-release").exists():
        return tree
    missing = missing_tools()
    if missing:
        raise HostError(f"cannot build the systemd host: apt-get install {' '.join(missing)}")
    mirror, keyring = debian_mirror()
    cache.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed: an interrupted build never looks complete.
    partial = Path(tempfile.mkdtemp(prefix=f"{tree.name}.partial.", dir=cache))
    log = cache / f"{tree.name}.build.log"
    progress(f"building a Debian {SUITE} tree with systemd into {tree} (debootstrap from {mirror}; once)")
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}"]
    if keyring and os.path.exists(keyring):
        argv.append(f"--keyring={keyring}")
    argv += [SUITE, str(partial), mirror]
    started = time.monotonic()
    try:
        with open(log, "w") as out:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, **_apt_proxy()})
        if done.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise HostError(f"cannot build the systemd host: debootstrap failed ({' | '.join(tail)}; "
                            f"full log: {log})")
        _customize(partial)
        try:
            partial.rename(tree)
        except OSError:
            if not (tree / "usr" / "lib" / "os-release").exists():
                raise
            # A concurrent run finished the same build first: use its tree.
    finally:
        if partial.exists():
            _remove_tree(partial)
    progress(f"built {tree} in {time.monotonic() - started:.0f} s")
    for old in cache.iterdir():  # trees from older recipes
        if old.is_dir() and old != tree and re.fullmatch(r"[0-9a-f]{12}", old.name):
            _remove_tree(old)
    return tree


def _customize(root: Path) -> None:
    for unit in MASKED:
        link = root / "etc" / "systemd" / "system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    # debootstrap's downloads are of no use in the tree.
    for deb in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()
    # Each boot gets a fresh machine id (nspawn passes one): no two runs share a journal.
    (root / "etc" / "machine-id").write_text("")


def _remove_tree(path: Path) -> None:
    # Trees hold device nodes and read-only directories; only rm copes with both.
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def wheelhouse(project: Path, cache: Path = CACHE) -> Path:
    """Wheels for ``pip install`` of ``project`` with no index: its dependencies and build backend.

    The container has no network; pip inside is pointed at these with
    PIP_NO_INDEX/PIP_FIND_LINKS, which leaves docs/service.md's commands as they are.
    """
    meta = tomllib.loads((project / "pyproject.toml").read_text())
    wanted = [*meta["build-system"]["requires"], "wheel", *meta["project"]["dependencies"]]
    key = hashlib.sha256("\n".join([sys.version.split()[0], *wanted]).encode()).hexdigest()[:12]
    wheels = cache / f"wheels-{key}"
    if wheels.is_dir():
        return wheels
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{wheels.name}.partial.", dir=cache))
    try:
        # This interpreter is the bookworm python3 the container has (3.11): its wheels fit.
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--dest",
                               str(partial), *wanted], capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise HostError(f"cannot fetch netwatch's dependency wheels: pip download failed: {tail}")
        partial.rename(wheels)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    for old in cache.glob("wheels-*"):
        if old != wheels and ".partial." not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    return wheels


# -- the booted container ------------------------------------------------------


class SystemdHost:
    """One boot of the cached tree: systemd as PID 1 in its own network namespace."""

    def __init__(self, tree: Path, binds_ro: Sequence[tuple[Path, str]] = (), boot_timeout: float = 120) -> None:
        self.tree = tree
        self.binds_ro = list(binds_ro)
        self.boot_timeout = boot_timeout
        self.machine = f"nwt-sd-{uuid.uuid4().hex[:8]}"
        self.workdir: Path | None = None
        self.root: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None  # the container's PID 1, as seen from the host
        self.cgroups: list[Path] = []
        self.nspawn_dir_existed = True
        self.leftovers: list[str] = []  # what close() could not remove

    # -- boot and teardown ---------------------------------------------------

    def __enter__(self) -> SystemdHost:
        try:
            self._boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _boot(self) -> None:
        self.nspawn_dir_existed = NSPAWN_RUN.exists()
        self.workdir = Path(tempfile.mkdtemp(prefix="nwt-systemd-"))
        upper, work, self.root = (self.workdir / name for name in ("upper", "work", "root"))
        for path in (upper, work, self.root):
            path.mkdir()
        # An overlay over the cached tree: the boot writes to a throwaway upper
        # directory in an instant, and the cache stays as built.
        done = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                               f"lowerdir={self.tree},upperdir={upper},workdir={work}", str(self.root)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            self.root = None
            raise HostError(f"cannot mount an overlay of {self.tree}: {done.stderr.strip()}")
        argv = ["systemd-nspawn", "--boot", f"--directory={self.root}", f"--machine={self.machine}",
                "--register=no", "--keep-unit", "--private-network", "--bind=/dev/net/tun", "--system-call-filter=bpf",
                "--console=read-only", "--kill-signal=SIGRTMIN+3"]
        argv += [f"--bind-ro={host}:{inside}" for host, inside in self.binds_ro]
        # cgroup v2 inside, so that the container's systemd enforces device policies (module docstring).
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        # With no systemd on the host to make it a scope (--keep-unit), nspawn
        # puts the container in "payload" and itself in "supervisor" next to
        # the cgroup it was started in: start it in cgroups of its own, so
        # that those land in there and can be removed afterwards.
        self.cgroups = [Path(hierarchy) / self.machine for hierarchy in CGROUP_HIERARCHIES
                        if os.path.isdir(hierarchy)]
        for cgroup in self.cgroups:
            cgroup.mkdir()
        procs = [str(cgroup / "cgroup.procs") for cgroup in self.cgroups]
        with open(self.workdir / "console.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                         preexec_fn=lambda: _nspawn_child(procs))
        self.leader = wait_until(self._find_leader, 30, "the container's PID 1 to appear", self.console)
        wait_until(self._booted, self.boot_timeout, "systemd in the container to finish booting",
                   lambda: self.console() + "\n" + self.run("systemctl list-jobs --no-pager", check=False).stdout,
                   interval=0.2)

    def _find_leader(self) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise HostError(f"systemd-nspawn exited ({self.proc.returncode}) before the container booted:\n"
                            f"{self.console()}")
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    nspid = _status_field(int(child), "NSpid").split()
                    if len(nspid) >= 2 and nspid[-1] == "1":
                        return int(child)
        return None

    def _booted(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise HostError(f"the container stopped while booting:\n{self.console()}")
        state = self.run("systemctl is-system-running", check=False).stdout.strip()
        return state in ("running", "degraded")

    def close(self) -> None:
        """Power the container off and remove every trace of it."""
        if self.proc is not None:
            if self.proc.poll() is None:
                # nspawn turns SIGTERM into a clean poweroff of the container (SIGRTMIN+3 to its init).
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(60)
                except subprocess.TimeoutExpired:
                    # Killing a PID namespace's init kills everything in it; nspawn then exits.
                    if self.leader is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(self.leader, signal.SIGKILL)
                    try:
                        self.proc.wait(20)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait(10)
            self.proc = None
        for cgroup in self.cgroups:
            # Deepest first; a cgroup with a process left in it cannot be removed (EBUSY).
            for path in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    path.rmdir()
            try:
                cgroup.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.leftovers.append(f"cgroup {cgroup}: {exc.strerror}")
        self.cgroups = []
        if self.root is not None:
            done = subprocess.run(["umount", str(self.root)], capture_output=True, text=True)
            if done.returncode != 0:
                self.leftovers.append(f"overlay {self.root}: {done.stderr.strip()}")
                # Still busy: detach it now; the kernel frees it when the last user goes.
                subprocess.run(["umount", "--lazy", str(self.root)], capture_output=True, text=True)
            self.root = None
        if self.workdir is not None:
            _remove_tree(self.workdir)
            if self.workdir.exists():
                self.leftovers.append(f"directory {self.workdir}")
            self.workdir = None
        # nspawn leaves its empty lock and propagation directories behind.
        if not self.nspawn_dir_existed:
            for path in (NSPAWN_RUN / "propagate", NSPAWN_RUN / "locks", NSPAWN_RUN):
                with contextlib.suppress(OSError):
                    path.rmdir()

    def console(self) -> str:
        """The tail of the container's console (systemd's boot and shutdown messages)."""
        if self.workdir is None:
            return ""
        try:
            text = (self.workdir / "console.log").read_text(errors="replace")
        except OSError:
            return ""
        return "--- container console (tail) ---\n" + "\n".join(text.splitlines()[-40:])

    # -- running things inside ----------------------------------------------

    def argv(self, command: str, env: dict[str, str] | None = None) -> list[str]:
        """A host argv that runs the shell ``command`` inside, as root, in a clean environment."""
        assert self.leader is not None, "not booted"
        assignments = [f"{key}={value}" for key, value in
                       {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "",
                        "SYSTEMD_COLORS": "0", **(env or {})}.items()]
        # --all: every namespace of the container's init (mount, pid, net, ipc,
        # uts, cgroup); entering its mount namespace also makes its root ours.
        return ["nsenter", f"--target={self.leader}", "--all", "--", "env", "-i", *assignments,
                "bash", "-c", command]

    def run(self, command: str, check: bool = True, timeout: float = 60, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a shell command inside; ``check``: raise with its output if it fails."""
        try:
            done = subprocess.run(self.argv(command, env), capture_output=True, text=True, timeout=timeout,
                                  input=input, stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise Deadline(f"timed out after {timeout:g} s in the container: {command}") from exc
        if check and done.returncode != 0:
            raise AssertionError(f"in the container: {command}\nexit {done.returncode}\n"
                                 f"stdout: {done.stdout.strip()}\nstderr: {done.stderr.strip()}")
        return done

    def out(self, command: str, check: bool = True, timeout: float = 60) -> str:
        return self.run(command, check=check, timeout=timeout).stdout

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside (its directory is created)."""
        self.run(f"mkdir -p {shlex.quote(os.path.dirname(path))} && cat > {shlex.quote(path)} && "
                 f"chmod {mode:o} {shlex.quote(path)}", input=text)

    def unit_property(self, unit: str, name: str) -> str:
        return self.out(f"systemctl show -P {shlex.quote(name)} {shlex.quote(unit)}", check=False).strip()

    def device_policy_enforced(self) -> tuple[bool, str]:
        """Whether a unit with DevicePolicy=closed is really kept from /dev/net/tun (and allowed it with
        DeviceAllow=); with what each attempt printed."""
        probe = ("python3 -c \"import os; os.close(os.open('/dev/net/tun', os.O_RDWR)); print('opened')\"")
        results = []
        for props in ("-p DevicePolicy=closed", "-p DevicePolicy=closed -p 'DeviceAllow=/dev/net/tun rw'"):
            done = self.run(f"systemd-run --quiet --wait --pipe --collect {props} {probe}", check=False,
                            timeout=30)
            results.append((done.returncode, (done.stdout + done.stderr).strip()))
        (denied_rc, denied_out), (allowed_rc, allowed_out) = results
        report = f"closed: exit {denied_rc}: {denied_out}\nclosed + DeviceAllow: exit {allowed_rc}: {allowed_out}"
        return denied_rc != 0 and "opened" not in denied_out and allowed_rc == 0 and "opened" in allowed_out, report


def _status_field(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split(":", 1)[1].strip()
    return ""


def _nspawn_child(cgroup_procs: list[str]) -> None:
    """In nspawn before exec: move into its own cgroups; get SIGTERM (a clean poweroff of the
    container) if the test process dies."""
    import ctypes
    for procs in cgroup_procs:
        with open(procs, "w") as f:
            f.write("0")
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def booted(binds_ro: Sequence[tuple[Path, str]] = (), progress: Callable[[str], None] = print
           ) -> Iterator[SystemdHost]:
    """Build (or reuse) the tree and boot it."""
    tree = build_tree(progress=progress)
    with SystemdHost(tree, binds_ro) as host:
        yield host
