"""A directory tree netwatch alone owns, reached without following anything.

Files in it are read back by a later netwatch and acted on, so nothing on
the way is trusted that could have been planted: below the tree's base
(state_dir, the admin's, checked at start) each directory is opened with
O_NOFOLLOW and worked in by its fd, and it, like each file read, must be
owned by netwatch's user and writable by it alone. What the files hold,
and what is said about one refused, is the caller's (netwatch/nic/records.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat

from netwatch.errors import NetwatchError

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted at a file's name must not block the event loop in open().
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


class Unusable(NetwatchError):
    """A directory or file in the tree is not one netwatch made (a symlink, others may write it)."""


class OwnTree:
    """``base/top`` and the directories below it, each netwatch's alone; ``base`` itself is followed."""

    def __init__(self, base: str, top: str) -> None:
        self.base = base
        self.top = top
        self.path = os.path.join(base, top)

    def open(self, sub: str | None = None, create: bool = False) -> OwnDir | None:
        """``top/sub`` (``top`` for None), each step opened without following; None if one is not there.

        ``create``: what is missing is made (0700), and a symlink or other
        file in place of a directory (in netwatch's own directory) replaced.
        Raises Unusable for a step that is not netwatch's alone, OSError for
        a reason that may pass.
        """
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            try:
                base = os.open(self.base, flags)
            except FileNotFoundError:
                if not create:
                    raise
                os.makedirs(self.base, mode=0o700, exist_ok=True)
                base = os.open(self.base, flags)
            try:
                top = OwnDir(_open_dir(base, self.top, self.path, create), self.path)
            finally:
                os.close(base)
            if sub is None:
                return top
            with top:
                return top.sub(sub, create)
        except FileNotFoundError:
            return None


class OwnDir:
    """An open directory of an :class:`OwnTree` and what is done in it, by its fd; a context manager (closes it)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path  # for messages only: nothing is opened by it

    def __enter__(self) -> OwnDir:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def sub(self, name: str, create: bool = False) -> OwnDir:
        """Directory ``name`` in this one (see :meth:`OwnTree.open`); FileNotFoundError if missing and not made."""
        path = os.path.join(self.path, name)
        return OwnDir(_open_dir(self.fd, name, path, create), path)

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def read(self, name: str, limit: int) -> bytes | None:
        """Up to ``limit`` bytes of plain file ``name``; None if there is none.

        Unusable (its text says why, without the path) when it is not a
        plain file or not netwatch's alone.
        """
        try:
            file = os.open(name, _READ_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENOTDIR, errno.ENXIO):
                raise Unusable("not a plain file") from None
            raise
        try:
            info = os.fstat(file)
            if not stat.S_ISREG(info.st_mode):
                raise Unusable("not a plain file")
            why = _not_own(info)
            if why:
                raise Unusable(why)
            return os.read(file, limit)
        finally:
            os.close(file)

    def replace(self, name: str, data: bytes) -> None:
        """File ``name`` holds ``data`` from now on, replaced whole (``name``.tmp written, then renamed).

        A crash of netwatch never leaves half a file. No fsync: what the tree
        holds describes the running host, which a reboot resets.
        O_EXCL|O_NOFOLLOW: a file planted at the temporary name is never
        written through; a stale one is removed first.
        """
        tmp = f"{name}.tmp"
        try:
            file = os.open(tmp, _WRITE_FLAGS, 0o600, dir_fd=self.fd)
        except FileExistsError:  # left by a netwatch that died mid-write, or planted
            os.unlink(tmp, dir_fd=self.fd)
            file = os.open(tmp, _WRITE_FLAGS, 0o600, dir_fd=self.fd)
        try:
            os.write(file, data)
        finally:
            os.close(file)
        os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def remove(self, name: str) -> None:
        """File ``name`` is gone (it may have been already)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)


def _not_own(info: os.stat_result) -> str | None:
    """Why a file or directory with ``info`` may not be netwatch's alone, or None."""
    if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"not netwatch's own and writable by it alone (owner uid {info.st_uid}, "
                f"mode {stat.S_IMODE(info.st_mode):04o})")
    return None


def _open_dir(parent: int, name: str, where: str, create: bool = False) -> int:
    """``name`` in ``parent``, a directory netwatch owns alone, opened without following a symlink.

    ``create``: made if missing (0700); a symlink or other file in its place
    (in netwatch's own directory) is removed first: the link itself, never
    what it points to.
    """
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        what = "a symlink" if exc.errno == errno.ELOOP else "not a directory"
        if not create:
            raise Unusable(f"{where} is {what}") from None
        os.unlink(name, dir_fd=parent)
        log.warning("replaced %s with a directory of netwatch's own: it was %s, which is never followed",
                    where, what)
        os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    try:
        why = _not_own(os.fstat(fd))
    except OSError:
        os.close(fd)
        raise
    if why:
        os.close(fd)
        raise Unusable(f"{where} is {why}")
    return fd
