from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from netwatch.sandbox.testbed import QEMU_BINARY, Netns

from .world import World

# CI runs the README's test command, which runs every test: there, a skip is
# a test that did not run (QEMU missing from PATH would skip about 230 and
# leave CI green), so it fails instead. A test that may rightly skip even in
# CI says why with @pytest.mark.allowed_skip("why").
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0 and shutil.which(QEMU_BINARY):
        return
    why = "needs root and qemu-system-x86 (use the README's test command)"
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if IN_CI and report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("allowed_skip") is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"skipped in CI (CI={os.environ.get('CI')}), where every test must run: {reason}\n"
                           "install what it needs (tools/bootstrap.sh), or mark it "
                           "@pytest.mark.allowed_skip(\"why it may skip in CI\")")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
        collector: pytest.Collector) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    # A whole module skipped at import (pytest.skip(allow_module_level=True)) is a skip too.
    report = yield
    if IN_CI and report.skipped:
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped in CI (CI={os.environ.get('CI')}), where every test must run: {reason}"
    return report


@pytest.fixture
def netns() -> Iterator[Netns]:
    with Netns("nwt") as ns:
        yield ns


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="nwt-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def world(short_tmp: Path, netns: Netns) -> Iterator[World]:
    world = World(short_tmp, netns)
    try:
        yield world
    finally:
        world.close()
