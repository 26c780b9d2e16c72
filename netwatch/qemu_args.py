"""The QEMU command-line arguments netwatch needs for one VM."""

from __future__ import annotations

import json
import shlex

from .config import NicConfig, VmConfig


def nic_args(nic: NicConfig) -> list[str]:
    """A fixed guest-side hubport and the NIC device peered with it.

    The backend joins the same hub later over QMP, so swapping it never
    touches the device the guest sees.
    """
    return [
        "-netdev", f"hubport,id={nic.guest_port},hubid={nic.hub}",
        "-device", f"{nic.model},id={nic.id},netdev={nic.guest_port},mac={nic.mac}",
    ]


def vm_args(vm: VmConfig) -> list[str]:
    # A dedicated monitor: QMP serves one client at a time, so other tools
    # keep their own. wait=off lets QEMU start before netwatch connects.
    args = ["-qmp", f"unix:{vm.qmp},server=on,wait=off"]
    for nic in vm.nics:
        args += nic_args(nic)
    return args


def render(vm: VmConfig, as_json: bool) -> str:
    args = vm_args(vm)
    return json.dumps(args) if as_json else shlex.join(args)
