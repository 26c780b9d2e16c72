"""The ``netwatch`` command line: one sentence per error, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any, NoReturn

from netwatch import config as config_mod
from netwatch import events, logbuffer
from netwatch.errors import BadRequest, ConfigError, ControlError, NetwatchError
from netwatch.service import control
from netwatch.untrusted import clean

EXIT_RUNTIME = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"netwatch: {message} (see 'netwatch --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="netwatch", description="Keep running QEMU VMs' NICs on their host links.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("-c", "--config", default=None,
                         help=f"config file (default: $NETWATCH_CONFIG or {config_mod.DEFAULT_PATH})")
        return cmd

    run = command("run", "run the service in the foreground")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    check = command("check", "validate the config file, and ask the kernel whether it has what its NICs need")
    check.add_argument("--no-kernel", dest="kernel", action="store_false",
                       help="validate the file only (the unit's ExecStartPre: a kernel without a module fails only "
                            "the NICs that need it, and the service serves the rest)")
    qemu_args = command("qemu-args", "print the QEMU arguments netwatch needs for a VM")
    form = qemu_args.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="a JSON array instead of a shell line")
    form.add_argument("--libvirt", action="store_true",
                      help="libvirt domain XML: an <interface> element per redirect-wired NIC, and a "
                           "<qemu:commandline> block for the other NICs")
    qemu_args.add_argument("vm", help="VM name")
    status = command("status", "show every VM and NIC as the running service sees it")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    rebind = command("rebind", "point a running NIC at another lower now (make-before-break)")
    rebind.add_argument("vm", help="VM name")
    rebind.add_argument("nic", help="NIC id")
    rebind.add_argument("lower", help="the new lower interface")
    reload = command("reload", "re-read the config file (like SIGHUP); a bad file is refused")
    reload.add_argument("--dry-run", action="store_true",
                        help="print what the reload would do (hot-add, hot-remove, rebind, replug); change nothing")
    hook = command("libvirt-hook", "pass a call of libvirt's qemu hook on to the service "
                   "(run by /etc/libvirt/hooks/qemu.d/netwatch, with the domain's XML on stdin)")
    hook.add_argument("arg", nargs="*", metavar="ARG", help="DOMAIN OPERATION SUB-OPERATION EXTRA, as libvirt "
                      "gives them")
    demo = sub.add_parser("demo", help="flap a lower under a sandboxed VM and show netwatch reattaching it")
    demo.add_argument("--flaps", type=int, default=5, help="how many times to flap the lower (default 5)")
    demo.add_argument("--no-guest", dest="guest", action="store_false",
                      help="no Linux guest: show frames at the guest NIC (needs no download)")
    return parser


def _load(path: str | None) -> config_mod.Config:
    return config_mod.load(path or config_mod.default_config_path())


def _fail(message: str, code: int) -> int:
    print(f"netwatch: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except ControlError as exc:
        for line in exc.problems:
            print(f"netwatch: {line}" if not line.startswith("/") else line, file=sys.stderr)
        return EXIT_USAGE if exc.bad_request else EXIT_RUNTIME
    except BadRequest as exc:
        return _fail(str(exc), EXIT_USAGE)
    except NetwatchError as exc:
        return _fail(str(exc), EXIT_RUNTIME)
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "check":
        cfg = _load(args.config)
        problems, notes = asyncio.run(_kernel_problems(cfg)) if args.kernel else ([], [])
        if problems:
            raise ConfigError(problems)
        nics = sum(len(vm.nics) for vm in cfg.vms)
        print(f"{cfg.path}: OK ({len(cfg.vms)} VMs, {nics} NICs)")
        for note in notes:
            print(f"{cfg.path}: note: {note}")
        return 0
    if args.command == "qemu-args":
        cfg = _load(args.config)
        vm = cfg.vm(args.vm)
        if vm is None:
            return _fail(f"no VM named '{args.vm}' in {cfg.path}", EXIT_USAGE)
        from netwatch.qemu.args import render, render_libvirt
        print(render_libvirt(vm) if args.libvirt else render(vm, args.json))
        return 0
    if args.command == "status":
        cfg = _load(args.config)
        result = control.request(cfg.settings.state_dir, "status")
        print(json.dumps(result, indent=2) if args.json else _status_text(result))
        return 0
    if args.command == "rebind":
        cfg = _load(args.config)
        result = control.request(cfg.settings.state_dir, "rebind", vm=args.vm, nic=args.nic, lower=args.lower)
        print(f"{args.vm}/{args.nic}: now on {result['lower']} ({result['ifname']}, netdev {result['netdev']}); "
              "holds until the next reload or restart")
        return 0
    if args.command == "reload":
        cfg = _load(args.config)
        if args.dry_run:
            result = control.request(cfg.settings.state_dir, "reload", dry_run=True)
            steps = result["plan"]
            for step in steps:
                where = f"{step['vm']}/{step['nic']}" if step["nic"] else step["vm"]
                print(f"{clean(step['action'])} {clean(where)}: {clean(step['why'])}")
            if not steps:
                print("nothing would change")
            return 0
        result = control.request(cfg.settings.state_dir, "reload")
        print(f"reloaded: {result['summary']}")
        return 0
    if args.command == "libvirt-hook":
        from netwatch.service import libvirthook
        try:
            state_dir = _load(args.config).settings.state_dir
        except ConfigError as exc:
            # libvirt goes on all the same; its log gets why netwatch heard nothing.
            print(f"netwatch libvirt-hook: {exc.problems[0] if exc.problems else exc}", file=sys.stderr)
            return 0
        return libvirthook.main(state_dir, args.arg)
    if args.command == "run":
        cfg = _load(args.config)
        events.setup(verbose=args.verbose)
        from netwatch.service.daemon import Service
        try:
            asyncio.run(Service(cfg).run())
        finally:
            logbuffer.flush()  # before a last error line of the CLI's own
        return 0
    if args.command == "demo":
        if args.flaps < 1:
            return _fail("--flaps must be at least 1", EXIT_USAGE)
        from netwatch.sandbox.demo import run_demo
        return run_demo(args.flaps, args.guest)
    raise AssertionError(args.command)


# The NICs a kernel problem line names, before "and N more".
NAMED_NICS = 3


async def _kernel_problems(cfg: config_mod.Config) -> tuple[list[str], list[str]]:
    """One line per module the kernel lacks and some NIC's wiring needs, naming those NICs; and what could
    not be checked (a note, not a problem). The kernel is asked only when some NIC needs a module."""
    from netwatch.host.kernelcheck import KernelSupport, check_kernel
    from netwatch.service.daemon import modules_needed
    needing = {module: [f"vm '{vm.name}' nic '{nic.id}'" for vm in cfg.vms for nic in vm.nics
                        if module in modules_needed(nic)]
               for module in {module for vm in cfg.vms for nic in vm.nics for module in modules_needed(nic)}}
    if not needing:
        return [], []
    support = await check_kernel()
    problems = []
    for module in support.missing:
        nics = needing.get(module)
        if not nics:
            continue
        named = ", ".join(nics[:NAMED_NICS]) + (f" and {len(nics) - NAMED_NICS} more NICs"
                                                if len(nics) > NAMED_NICS else "")
        said = KernelSupport(missing=(module,)).sentences()[0]
        problems.append(f"{cfg.path}: {named}: key 'wiring': {said}: \"redirect\" needs it")
    unknown = tuple(module for module in support.unchecked if module in needing)
    notes = KernelSupport(unchecked=unknown, why_unchecked=support.why_unchecked).sentences()
    return problems, notes


STATUS_COLUMNS = ("VM", "NIC", "STATE", "BACKEND", "IFNAME", "LOWER", "WIRING", "PCI", "SWAPS", "RX", "TX")


def _size(value: object) -> str:
    """Bytes as an admin reads them: 1.2K, 34M, 5.6G (powers of 1024, like ip -h)."""
    if not isinstance(value, int):
        return "-"
    amount = float(value)
    for unit in ("B", "K", "M", "G", "T"):
        if amount < 1024 or unit == "T":
            return f"{amount:.0f}{unit}" if unit == "B" or amount >= 10 else f"{amount:.1f}{unit}"
        amount /= 1024
    return "-"


def _status_text(result: dict[str, Any]) -> str:
    """A table to scan (like networkctl), one row per NIC; then, for NICs not attached, why.

    Every value is shown through clean(): a cause may quote QEMU, which a
    guest may own, and an older service may not have cleaned it.
    """
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    vms = result.get("vms", [])
    for vm in vms:
        name = clean(vm["name"])
        if not vm.get("nics"):
            rows.append((name, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-"))
        for nic in vm.get("nics", []):
            lower = clean(nic["lower"]) + ("" if nic["lower_present"] else " (absent)")
            wiring = clean(nic.get("wiring") or "hub") + (f"x{nic['queues']}" if nic.get("queues", 1) > 1 else "")
            rows.append((name, clean(nic["id"]), clean(nic["state"]), clean(nic["backend"]), clean(nic["ifname"]),
                         lower, wiring, clean(nic.get("guest_pci") or "-"), str(nic["swaps"]),
                         _size(nic.get("rx_bytes")), _size(nic.get("tx_bytes"))))
            where = f"{name}/{clean(nic['id'])}"
            if nic["state"] in ("failed", "waiting-lower", "waiting-vm"):
                notes.append(f"{where}: {clean(nic['cause'])}")
            if nic.get("removing"):
                notes.append(f"{where}: being hot-removed")
            if nic.get("migration") and nic["state"] == "attached":
                hooks = "configured" if nic.get("configured") else "not configured (routed: one host at a time)"
                notes.append(f"{where}: migrating {'in' if nic['migration'] == 'in' else 'out'}, {hooks}")
    if not rows:
        return "no VMs configured"
    widths = [max(len(row[i]) for row in (STATUS_COLUMNS, *rows)) for i in range(len(STATUS_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in (STATUS_COLUMNS, *rows)]
    nics = sum(len(vm.get("nics", [])) for vm in vms)
    attached = sum(1 for vm in vms for nic in vm.get("nics", []) if nic["state"] == "attached")
    lines.append("")
    lines.append(f"{len(vms)} VMs, {nics} NICs, {attached} attached.")
    for vm in vms:
        state = (f"QEMU pid {vm.get('qemu_pid')}, {clean(vm.get('run_state') or '?')}" if vm.get("connected")
                 else "not connected")
        lines.append(f"{clean(vm['name'])}: {state} ({clean(vm['qmp'])})")
    lines += notes
    return "\n".join(lines)


def entry() -> NoReturn:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`netwatch status | head`): nothing more to say, and no
        # traceback; stdout is pointed at /dev/null so the interpreter's own flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_RUNTIME
    sys.exit(code)
