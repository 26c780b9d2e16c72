"""Issue 22 item 5: a kernel without a module the redirect wiring needs gets one sentence naming it, at
`netwatch check` (exit 2) and in `netwatch run` (those NICs failed with it, every other NIC served), only for
the NICs that need it, and no question to the kernel at all when no NIC is redirect-wired.

Modules cannot be removed from this kernel: what the kernel check answers is canned (a stand-in for
kernelcheck.check_kernel, in this process or in the netwatch it starts); the real check runs too, where this
kernel has everything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netwatch import cli
from netwatch.config import NicConfig
from netwatch.host import kernelcheck
from netwatch.host.kernelcheck import MODULES, KernelSupport
from netwatch.sandbox.testbed import Netwatch, _die_with_parent, wait_until, write_config

from .test_redirect import frame_reaches_tap, redirect_nic
from .world import World, run_netwatch

REPO = Path(__file__).resolve().parent.parent


def _config(path: Path, vms: list[dict[str, Any]]) -> str:
    write_config(str(path), str(path.parent / "state"), vms)
    return str(path)


def _vm(name: str, *nics: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "qmp": f"/run/nwt-{name}.qmp", "nics": list(nics)}


def _redirect(nic_id: str, mac: str) -> dict[str, Any]:
    return {"id": nic_id, "backend": "macvtap", "wiring": "redirect", "lower": "eth1", "mac": mac}


HUB = {"id": "net9", "backend": "macvtap", "lower": "eth1", "mac": "52:54:00:9c:00:09"}


class Canned:
    """What check_kernel answers (the last of ``answers``), and how often it was asked."""

    def __init__(self) -> None:
        self.answers: list[KernelSupport] = [KernelSupport()]
        self.calls = 0

    def says(self, support: KernelSupport) -> None:
        self.answers.append(support)


@pytest.fixture
def canned(monkeypatch: pytest.MonkeyPatch) -> Canned:
    """kernelcheck.check_kernel answering what the test says, in this process."""
    kernel = Canned()

    async def check_kernel(timeout: float = kernelcheck.CHECK_TIMEOUT) -> KernelSupport:
        kernel.calls += 1
        return kernel.answers[-1]
    monkeypatch.setattr(kernelcheck, "check_kernel", check_kernel)
    return kernel


def _check(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], list[str]]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_check_says_which_module_is_missing_for_the_nics_that_need_it(
        tmp_path: Path, canned: Canned, capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path / "nw.toml", [
        _vm("a", _redirect("n0", "52:54:00:9c:00:01"), _redirect("n1", "52:54:00:9c:00:02"), HUB),
        _vm("b", _redirect("n0", "52:54:00:9c:00:03"), _redirect("n1", "52:54:00:9c:00:04")),
        _vm("c", dict(HUB, mac="52:54:00:9c:00:0a"))])
    canned.says(KernelSupport(missing=("act_mirred",)))
    code, out, err = _check(["check", "-c", path], capsys)
    # One line for the module, naming the NICs that need it (the first three, then how many more): not the hub
    # NICs, and no "OK".
    assert (code, out, err) == (2, [], [
        f"{path}: vm 'a' nic 'n0', vm 'a' nic 'n1', vm 'b' nic 'n0' and 1 more NICs: key 'wiring': the kernel has no "
        "act_mirred (CONFIG_NET_ACT_MIRRED): \"redirect\" needs it"]), err

    canned.says(KernelSupport(missing=("tun", "cls_u32"), unchecked=("macvlan",),
                                why_unchecked="macvlan: it needs tun"))
    code, out, err = _check(["check", "-c", path], capsys)
    assert code == 2 and [line.split(": key 'wiring': ")[1] for line in err] == [
        "the kernel has no tun (CONFIG_TUN): \"redirect\" needs it",
        "the kernel has no cls_u32 (CONFIG_NET_CLS_U32): \"redirect\" needs it"], err

    # What could not be checked is a note, not a problem.
    canned.says(KernelSupport(unchecked=tuple(MODULES), why_unchecked="netwatch is not running as root"))
    code, out, err = _check(["check", "-c", path], capsys)
    assert (code, err) == (0, [])
    assert out == [f"{path}: OK (3 VMs, 6 NICs)",
                   f"{path}: note: could not check whether the kernel has tun, macvlan, sch_ingress, cls_u32, "
                   "act_mirred: netwatch is not running as root"], out
    assert canned.calls == 3

    # The unit's ExecStartPre: the file only.
    canned.says(KernelSupport(missing=("act_mirred",)))
    assert _check(["check", "--no-kernel", "-c", path], capsys) == (0, [f"{path}: OK (3 VMs, 6 NICs)"], [])
    assert canned.calls == 3


def test_no_question_to_the_kernel_without_a_redirect_nic(
        tmp_path: Path, canned: Canned, capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path / "nw.toml", [_vm("a", HUB)])
    canned.says(KernelSupport(missing=tuple(MODULES)))
    assert _check(["check", "-c", path], capsys) == (0, [f"{path}: OK (1 VMs, 1 NICs)"], [])
    assert canned.calls == 0


def test_a_nic_is_refused_only_for_modules_its_wiring_needs() -> None:
    from netwatch.service.daemon import modules_needed, refusal
    def nic(wiring: str) -> NicConfig:
        return NicConfig(id="n0", backend="macvtap", mac="52:54:00:9c:00:01", hub=0, model="virtio-net-pci",
                         ifname="nw-a-n0", wiring=wiring)
    assert modules_needed(nic("redirect")) == tuple(MODULES)
    assert modules_needed(nic("hub")) == modules_needed(nic("direct")) == ()
    lacking = KernelSupport(missing=("cls_u32", "act_mirred"), unchecked=("macvlan",), why_unchecked="?")
    assert refusal(nic("redirect"), lacking) == ("the kernel has no cls_u32 (CONFIG_NET_CLS_U32); the kernel has no "
                                                 "act_mirred (CONFIG_NET_ACT_MIRRED): wiring = \"redirect\" needs them")
    assert refusal(nic("redirect"), KernelSupport(missing=("tun",))) == \
        "the kernel has no tun (CONFIG_TUN): wiring = \"redirect\" needs it"
    assert refusal(nic("hub"), lacking) is None and refusal(nic("direct"), lacking) is None
    # Not known is not lacking: served.
    assert refusal(nic("redirect"), KernelSupport(unchecked=tuple(MODULES), why_unchecked="?")) is None


# -- the real check, on this kernel (it has everything) ------------------------------------------------------


@pytest.fixture
def shared_config() -> Iterator[Path]:
    """A redirect config another user can read (pytest's tmp_path is root's alone)."""
    where = Path(tempfile.mkdtemp(prefix="nwt-kc-"))
    try:
        where.chmod(0o755)
        path = Path(_config(where / "nw.toml", [_vm("a", _redirect("n0", "52:54:00:9c:00:01"), HUB)]))
        path.chmod(0o644)
        yield path
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.integration
def test_check_on_this_kernel_as_root_and_as_another_user(shared_config: Path) -> None:
    path = str(shared_config)
    as_root = run_netwatch("check", "-c", path)
    assert (as_root.returncode, as_root.stdout.splitlines(), as_root.stderr) == (
        0, [f"{path}: OK (1 VMs, 2 NICs)"], ""), as_root.stderr
    nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                             "netwatch", "check", "-c", path], capture_output=True, text=True, timeout=60,
                            cwd=REPO, check=False)
    # One line saying the kernel was not checked; not an error.
    assert (nobody.returncode, nobody.stderr, nobody.stdout.splitlines()) == (0, "", [
        f"{path}: OK (1 VMs, 2 NICs)",
        f"{path}: note: could not check whether the kernel has tun, macvlan, sch_ingress, cls_u32, act_mirred: "
        "netwatch is not running as root"]), nobody.stderr


@pytest.mark.integration
def test_run_on_this_kernel_says_it_has_everything(world: World) -> None:
    world.vm("vm1", redirect_nic())
    world.lower("lo0", "wi0")
    netwatch = world.start_netwatch()
    wait_until(lambda: world.ns.link_exists("nw-vm1-net0"), 10, "the persistent tap", world.dump)
    world.start_qemu("vm1")
    world.wait_state("vm1", "net0", "attached")
    assert "the kernel has what wiring = \"redirect\" needs: tun, macvlan, sch_ingress, cls_u32, act_mirred" \
        in netwatch.log(), netwatch.log()


# -- netwatch run with canned answers --------------------------------------------------------------------------

# netwatch run, its kernel check answered from a JSON file the test rewrites; each check appends a line to a
# second file.
LAUNCHER = """
import json, os, sys
from netwatch.host import kernelcheck

async def check_kernel(timeout=kernelcheck.CHECK_TIMEOUT):
    with open(os.environ["NWT_KERNEL_CALLS"], "a") as calls:
        calls.write("check\\n")
    with open(os.environ["NWT_KERNEL_ANSWER"]) as answer:
        said = json.load(answer)
    return kernelcheck.KernelSupport(tuple(said["missing"]), tuple(said.get("unchecked", ())), said.get("why", ""))

kernelcheck.check_kernel = check_kernel
from netwatch.cli import entry
sys.argv = ["netwatch", "run", "-c", sys.argv[1]]
entry()
"""


class CannedNetwatch(Netwatch):
    """netwatch run as world.start_netwatch starts it, but with the kernel's answers canned."""

    def __init__(self, world: World, answer: Path, calls: Path) -> None:
        super().__init__(world.ns, world.config_path, str(world.tmp / "netwatch.log"),
                         {"NWT_KERNEL_ANSWER": str(answer), "NWT_KERNEL_CALLS": str(calls)})

    def start(self) -> CannedNetwatch:
        assert self.netns is not None
        env = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
        env["NETWATCH_JOURNAL_SOCKET"] = "/nonexistent"
        env.update(self.env)
        env["PYTHONPATH"] = str(REPO)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.netns.exec_argv(sys.executable, "-c", LAUNCHER, self.config_path),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                         preexec_fn=_die_with_parent, cwd=REPO)
        return self


class Kernel:
    """What the canned kernel check answers, and how often it was asked."""

    def __init__(self, tmp: Path) -> None:
        self.answer, self.calls_file = tmp / "kernel-answer.json", tmp / "kernel-calls"
        self.calls_file.write_text("")
        self.says()

    def says(self, *missing: str) -> None:
        self.answer.write_text(json.dumps({"missing": list(missing)}))

    @property
    def calls(self) -> int:
        return len(self.calls_file.read_text().splitlines())


HUB_VM2 = {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": "52:54:00:9c:01:01"}
NO_MIRRED = "the kernel has no act_mirred (CONFIG_NET_ACT_MIRRED): wiring = \"redirect\" needs it"


@pytest.mark.integration
def test_run_fails_only_the_redirect_nics_and_serves_the_rest(world: World) -> None:
    kernel = Kernel(world.tmp)
    kernel.says("act_mirred")
    world.vm("vm1", redirect_nic())
    world.vm("vm2", HUB_VM2)
    world.lower("lo0", "wi0")
    world.netwatch = CannedNetwatch(world, kernel.answer, kernel.calls_file).start()
    refused = world.wait_state("vm1", "net0", "failed")
    assert refused["cause"] == NO_MIRRED, refused
    assert kernel.calls == 1
    # Its tap is there all the same: its VM starts (QEMU opens the tap by name), the NIC joins nothing.
    assert world.ns.link_exists("nw-vm1-net0")
    world.start_qemu("vm1")
    world.start_qemu("vm2")
    world.wait_state("vm2", "net0", "attached")
    world.frame_reaches_guest("vm2", "net0", "wi0")
    assert world.nic("vm1", "net0")["cause"] == NO_MIRRED
    assert world.ns.links("macvlan") == [], world.dump()
    # Said once, as the NIC's own error entry.
    log = world.netwatch.log()
    assert log.count(NO_MIRRED) == 1 and "vm1/net0: waiting-vm -> failed: " + NO_MIRRED in log, log


@pytest.mark.integration
def test_reload_asks_the_kernel_when_a_redirect_nic_comes_and_while_it_lacked_something(world: World) -> None:
    kernel = Kernel(world.tmp)
    world.vm("vm2", HUB_VM2)
    world.lower("lo0", "wi0")
    world.netwatch = CannedNetwatch(world, kernel.answer, kernel.calls_file).start()
    world.start_qemu("vm2")
    world.wait_state("vm2", "net0", "attached")
    assert kernel.calls == 0, "no NIC is redirect-wired: the kernel is not asked"

    kernel.says("act_mirred")
    world.vm("vm1", redirect_nic())
    assert world.cli("reload").returncode == 0
    assert kernel.calls == 1
    assert world.wait_state("vm1", "net0", "failed")["cause"] == NO_MIRRED
    world.start_qemu("vm1")
    swaps = world.nic("vm2", "net0")["swaps"]

    # Still lacking: asked again at each reload (a module loaded since would serve the NIC).
    assert world.cli("reload").returncode == 0
    assert kernel.calls == 2 and world.nic("vm1", "net0")["state"] == "failed"

    kernel.says()  # the admin loaded it
    assert world.cli("reload").returncode == 0
    assert kernel.calls == 3
    world.wait_state("vm1", "net0", "attached")
    frame_reaches_tap(world, "wi0")

    # Nothing new, nothing lacking: not asked.
    assert world.cli("reload").returncode == 0
    assert kernel.calls == 3
    # The hub NIC beside it was served throughout, never replugged.
    world.frame_reaches_guest("vm2", "net0", "wi0")
    assert world.nic("vm2", "net0")["swaps"] == swaps
    wait_until(lambda: world.nic("vm1", "net0")["state"] == "attached", 5, "vm1/net0 to stay attached", world.dump)
