"""Which wiring a NIC gets (netwatch/nic/wiring.py says what a wiring is)."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from netwatch.config import NicConfig
from netwatch.nic.env import NicEnv
from netwatch.nic.hookplan import HookPlan
from netwatch.nic.redirect import RedirectWiring
from netwatch.nic.swapped import SwappedBackend
from netwatch.nic.wiring import NicWiring
from netwatch.qemu.qmp import VmSession
from netwatch.qemu.vm import QemuVm


def make_wiring(vm_name: str, nic: NicConfig, vm: QemuVm, env: NicEnv, hooks: HookPlan,
                lower_name: Callable[[], str | None]) -> NicWiring:
    if nic.wiring == "redirect":
        # One tap for QEMU's whole life, joined to each lower in the kernel.
        return RedirectWiring(vm_name, nic, vm, env, hooks, lower_name)
    # "hub" and "direct": a backend per lower, handed to QEMU over netwatch's monitor (config.py makes
    # every VM with such a NIC have one).
    return SwappedBackend(vm_name, nic, cast(VmSession, vm), env, hooks, lower_name)
