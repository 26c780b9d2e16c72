"""Small pieces on their own: the state table, QEMU's network listing, the control protocol."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from netwatch.errors import ControlError, NetwatchError
from netwatch.nic.state import TRANSITIONS, IllegalTransition, NicEvent, NicState, NicStateMachine
from netwatch.qemu.qmp import HubPort, parse_info_network
from netwatch.service import control


def test_every_state_can_be_left_and_reached() -> None:
    assert set(TRANSITIONS) == set(NicState)
    reachable = {target for moves in TRANSITIONS.values() for target in moves.values()}
    assert reachable == set(NicState)
    for state, moves in TRANSITIONS.items():
        assert any(target is not state for target in moves.values()), f"{state} cannot be left"


def test_the_table_forbids_what_it_documents() -> None:
    allowed = {(state, event) for state, moves in TRANSITIONS.items() for event in moves}
    # 26 of the 40 (state, event) pairs: a table that allows nearly every pair documents nothing.
    assert len(allowed) <= len(NicState) * len(NicEvent) * 2 // 3, len(allowed)
    # Only an attach makes a NIC attached anew, and only the attach's outcome (or a failure) ends it.
    assert {state for state, moves in TRANSITIONS.items() if NicEvent.ATTACHED in moves} == {NicState.ATTACHING}
    assert set(TRANSITIONS[NicState.ATTACHING]) == {NicEvent.ATTACHED, NicEvent.LOWER_VANISHED, NicEvent.ERROR}
    # A NIC waiting for its lower is never attached without being made.
    assert NicEvent.KEPT not in TRANSITIONS[NicState.WAITING_LOWER]
    assert NicState.ATTACHED not in TRANSITIONS[NicState.WAITING_LOWER].values()


def test_state_machine_logs_once_and_refuses_illegal_moves(caplog: pytest.LogCaptureFixture) -> None:
    fsm = NicStateMachine("vm", "net0")
    assert fsm.state is NicState.WAITING_VM
    with caplog.at_level("INFO", logger="netwatch"):
        assert fsm.on(NicEvent.LOWER_MISSING, "lower eth1 is not present")
        assert not fsm.on(NicEvent.LOWER_MISSING, "again")
    assert [r.getMessage() for r in caplog.records] == ["waiting-vm -> waiting-lower: lower eth1 is not present"]
    assert caplog.records[0].nw_event == "state"  # type: ignore[attr-defined]
    with pytest.raises(IllegalTransition):
        fsm.on(NicEvent.ATTACHED, "skipping attaching")


INFO = """hub 0
 \\ nw-net0-up3: nw-net0-tap3: index=0,type=tap,fd=12
 \\ obs0p: obs0: index=0,type=dgram,udp=/a:/b
 \\ nw-net0: net0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56
hub 1
 \\ nw-net1: net1: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:57
nw-net1-tap9: index=0,type=tap,fd=20
"""


def test_parse_info_network() -> None:
    info = parse_info_network(INFO)
    assert info.ports[0] == HubPort(0, "nw-net0-up3", "nw-net0-tap3", "tap")
    assert [p.hub for p in info.ports] == [0, 0, 0, 1]
    assert "nw-net1-tap9" in info.netdevs and "nw-net0-tap3" in info.netdevs
    assert parse_info_network("").ports == ()


async def _serve_one(tmp_path: Path, payloads: list[bytes]) -> list[dict[str, object]]:
    async def status(request: dict[str, object]) -> object:
        return {"vms": []}

    async def broken(request: dict[str, object]) -> object:
        raise NetwatchError("no such VM")

    answers = []
    async with control.ControlServer(str(tmp_path), {"status": status, "broken": broken}) as server:
        assert os.stat(server.path).st_mode & 0o777 == 0o600
        for payload in payloads:
            reader, writer = await asyncio.open_unix_connection(server.path, limit=1 << 20)
            writer.write(payload)
            await writer.drain()
            if not payload.endswith(b"\n"):
                writer.write_eof()
            line = await reader.readline()
            answers.append(json.loads(line))
            writer.close()
    return answers


def test_control_protocol_survives_garbage(tmp_path: Path) -> None:
    answers = asyncio.run(_serve_one(tmp_path, [
        b"not json\n", b"[1, 2]\n", b'{"cmd": 5}\n', b'{"cmd": "reboot"}\n', b'{"cmd": "broken"}\n',
        b"\xff\xfe\n", b'{"cmd": "status"', b"x" * (control.MAX_REQUEST + 10) + b"\n", b'{"cmd": "status"}\n',
    ]))
    errors = [a.get("error") for a in answers]
    assert errors[:8] == [
        "request is not JSON", "request must be an object with a string 'cmd'",
        "request must be an object with a string 'cmd'", "unknown command 'reboot'", "no such VM",
        "request is not JSON", "incomplete request (no newline)",
        f"request longer than {control.MAX_REQUEST} bytes"]
    assert answers[-1] == {"ok": True, "result": {"vms": []}}


def test_control_client_errors(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="netwatch is not running"):
        control.request(str(tmp_path), "status")


def test_control_peers_root_own_user_and_the_configured_group() -> None:
    import grp
    import pwd
    nobody = pwd.getpwnam("nobody")
    assert control.peer_allowed((0, 0), None)
    assert control.peer_allowed((os.getuid(), 0), None)
    assert not control.peer_allowed((nobody.pw_uid, nobody.pw_gid), None)
    group = grp.getgrgid(nobody.pw_gid).gr_name
    assert control.peer_allowed((nobody.pw_uid, nobody.pw_gid), group)
    assert not control.peer_allowed((nobody.pw_uid, nobody.pw_gid), "root")


def test_link_events_reach_only_the_nics_they_concern(tmp_path: Path) -> None:
    """Routing is by lookup: with hundreds of NICs, each event must not ask every NIC."""
    from netwatch.config import load
    from netwatch.host.links import Link, LinkTable
    from netwatch.nic.env import NicEnv
    from netwatch.nic.records import RecordStore
    from netwatch.service.hooks import HookRunner
    from netwatch.service.reconciler import Reconciler

    nics = "".join(f'[[vm.nic]]\nid = "n{i}"\nbackend = "macvtap"\nlower = "eth{i}"\nmac = "52:54:00:00:00:{i:02x}"\n'
                   f'guest_pci = "pci.{1 + i // 32}:{i % 32:#x}"\n' for i in range(1, 41))
    path = tmp_path / "netwatch.toml"
    path.write_text(f'[netwatch]\nstate_dir = "{tmp_path}"\n[[vm]]\nname = "v"\nqmp = "{tmp_path}/v.qmp"\n{nics}')

    async def main() -> list[str]:
        env = NicEnv(links=LinkTable(), ops=None, records=RecordStore(str(tmp_path)),  # type: ignore[arg-type]
                     hooks=HookRunner(str(tmp_path), 1), node_dir=str(tmp_path))
        reconciler = Reconciler(load(str(path)), env)
        for vm in reconciler.config.vms:
            reconciler.vms[vm.name] = None  # type: ignore[assignment]
            reconciler.nics[vm.name] = {}
            from netwatch.nic.controller import NicController
            for nic in vm.nics:
                controller = NicController(vm.name, nic, None, env)  # type: ignore[arg-type]
                reconciler.nics[vm.name][nic.id] = controller
                reconciler.update_interest(controller)
        for nic in reconciler.all_nics():
            nic._kick.clear()  # as after their first pass
        reconciler.on_link_change(None, Link(index=99, name="eth7", kind="veth", mac="02:00:00:00:00:07",
                                             parent=None, flags=1))
        reconciler.on_link_change(None, Link(index=98, name="unrelated", kind="veth", mac=None, parent=None,
                                             flags=1))
        return [nic.nic.id for nic in reconciler.all_nics() if nic.kicked]

    assert asyncio.run(main()) == ["n7"]


def test_a_nics_own_macvtap_shown_as_made_costs_no_pass(tmp_path: Path) -> None:
    """Events that only show the NIC's macvtap as made or recorded kick nothing; any real change does."""
    from netwatch.config import load
    from netwatch.host.links import Link, LinkTable
    from netwatch.nic.controller import NicController
    from netwatch.nic.env import NicEnv
    from netwatch.nic.records import NicRecord, RecordStore
    from netwatch.service.hooks import HookRunner
    from netwatch.service.reconciler import Reconciler

    path = tmp_path / "netwatch.toml"
    path.write_text(f'[netwatch]\nstate_dir = "{tmp_path}"\n[[vm]]\nname = "v"\nqmp = "{tmp_path}/v.qmp"\n'
                    '[[vm.nic]]\nid = "n1"\nbackend = "macvtap"\nlower = "eth1"\nmac = "52:54:00:00:00:01"\n')

    def macvtap(index: int = 50, name: str = "nw-v-n1", parent: int = 7, flags: int = 1) -> Link:
        return Link(index=index, name=name, kind="macvtap", mac="52:54:00:00:00:01", parent=parent, flags=flags)

    async def main() -> list[str]:
        env = NicEnv(links=LinkTable(), ops=None, records=RecordStore(str(tmp_path)),  # type: ignore[arg-type]
                     hooks=HookRunner(str(tmp_path), 1), node_dir=str(tmp_path))
        reconciler = Reconciler(load(str(path)), env)
        vm = reconciler.config.vms[0]
        nic = NicController(vm.name, vm.nics[0], None, env)  # type: ignore[arg-type]
        reconciler.nics[vm.name] = {"n1": nic}
        outcomes: list[str] = []

        def kicked_by(old: Link | None, new: Link | None) -> None:
            reconciler.update_interest(nic)
            nic._kick.clear()
            reconciler.on_link_change(old, new)
            outcomes.append("kick" if nic.kicked else "none")

        nic.wiring.halves.links.making = ("nw-v-n1", 7)  # being made on ifindex 7
        kicked_by(None, macvtap())  # its creation, before the kernel's answer is read
        kicked_by(None, macvtap(parent=8))  # the same name on another lower: not the one being made
        nic.wiring.halves.links.making = None
        nic.wiring.backend = NicRecord(vm="v", nic="n1", backend="macvtap", ifname="nw-v-n1", ifindex=50,
                                     lower="eth1", lower_ifindex=7, tap_netdev="nw-n1-tap1", hub_netdev="nw-n1-up1",
                                     generation=1, mac="52:54:00:00:00:01", mode="bridge", bridge=None, qemu_pid=1)
        kicked_by(macvtap(), macvtap(flags=0x41))  # up and running: flags only
        kicked_by(None, macvtap())  # its uevent
        kicked_by(macvtap(), macvtap(name="renamed"))
        kicked_by(macvtap(), None)  # gone
        kicked_by(None, macvtap(index=51))  # another link under its name
        return outcomes

    assert asyncio.run(main()) == ["none", "kick", "none", "none", "kick", "kick", "kick"]


def test_flags_netwatch_does_not_read_are_no_change() -> None:
    """A lower turning promiscuous (as macvtaps join it) is no change; its carrier is."""
    from netwatch.host import rtnl
    from netwatch.host.links import IFF_LOWER_UP, IFF_UP, LinkTable

    table = LinkTable()
    fields = {"index": 7, "name": "eth1", "kind": "veth", "mac": "02:00:00:00:00:07", "parent": None, "master": None}
    table.apply(rtnl.RTM_NEWLINK, {**fields, "flags": IFF_UP})
    old, new = table.apply(rtnl.RTM_NEWLINK, {**fields, "flags": IFF_UP | 0x100 | 0x200})  # PROMISC, ALLMULTI
    assert old == new
    old, new = table.apply(rtnl.RTM_NEWLINK, {**fields, "flags": IFF_UP | 0x100 | IFF_LOWER_UP})
    assert old != new and new is not None and new.carrier
