"""The suite's own guards: a skip in CI fails, and a dead or hung netwatch is never read as "no such NIC"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .world import NotAnswering, World

ROOT = Path(__file__).parent.parent

SKIPPING = textwrap.dedent('''
    import pytest

    def test_skips_at_run_time():
        pytest.skip("no frobnicator here")

    @pytest.mark.skipif(True, reason="not on this machine")
    def test_skipped_by_a_mark():
        pass

    @pytest.mark.allowed_skip("needs a second NUMA node, which CI machines do not have")
    def test_allowed_to_skip():
        pytest.skip("one NUMA node")

    @pytest.mark.xfail(reason="a known bug", strict=True)
    def test_expected_to_fail():
        assert False
''')


SKIPPED_MODULE = "import pytest\npytest.skip('no such module here', allow_module_level=True)\n"


def run_suite(tmp_path: Path, ci: str | None, text: str = SKIPPING) -> str:
    """The summary line, then the whole output, of pytest run with this suite's conftest on ``text``."""
    (tmp_path / "test_skipping.py").write_text(text)
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    if ci is not None:
        env["CI"] = ci
    # This suite's conftest as a plugin, on a test file of its own.
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.conftest", "-q",
                           "-rA", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
                           str(tmp_path / "test_skipping.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return done.stdout.splitlines()[-1] + "\n" + done.stdout


def test_a_skip_in_ci_is_a_failure_unless_allowed(tmp_path: Path) -> None:
    summary = run_suite(tmp_path, "true")
    # A skip in setup (a skipif mark, a fixture) fails as an error, one in the test as a failure.
    assert summary.startswith("1 failed, 1 skipped, 1 xfailed, 1 error in"), summary
    assert "FAILED" in summary and "skipped in CI (CI=true), where every test must run: Skipped: no frobnicator here" \
        in summary, summary
    assert "ERROR" in summary and "test_skipped_by_a_mark - skipped in CI" in summary, summary
    module = run_suite(tmp_path, "true", SKIPPED_MODULE)
    assert module.startswith("1 error in") and "skipped in CI" in module and "no such module here" in module, module


def test_outside_ci_a_skip_is_a_skip(tmp_path: Path) -> None:
    summary = run_suite(tmp_path, None)
    assert summary.startswith("3 skipped, 1 xfailed in"), summary
    assert run_suite(tmp_path, None, SKIPPED_MODULE).startswith("1 skipped in")


@pytest.mark.integration
def test_status_of_a_dead_or_hung_netwatch_is_no_answer(world: World) -> None:
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": "52:54:00:9e:14:01"})
    netwatch = world.start_netwatch()
    world.wait_state("vm1", "net0", "waiting-vm")
    assert world.nic("vm1", "net9") == {}, "an answer without the NIC: no such NIC"
    assert netwatch.proc is not None
    netwatch.proc.send_signal(signal.SIGSTOP)  # hangs: the request times out
    try:
        with pytest.raises(NotAnswering, match=r"did not answer.*netwatch running"):
            world.nic("vm1", "net9")
    finally:
        netwatch.proc.send_signal(signal.SIGCONT)
    world.wait_state("vm1", "net0", "waiting-vm")
    netwatch.proc.kill()  # crashed
    netwatch.proc.wait(10)
    with pytest.raises(NotAnswering, match=r"not running.*netwatch exited with -9"):
        world.nic("vm1", "net9")
    # A dump still shows what there is.
    assert "netwatch exited with -9" in world.dump()
