from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from netwatch.sandbox.testbed import QEMU_BINARY, Netns

from .world import World


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0 and shutil.which(QEMU_BINARY):
        return
    why = "needs root and qemu-system-x86 (use the README's test command)"
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


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
