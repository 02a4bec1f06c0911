"""Wake a thread when files in one directory are written (Linux inotify, through libc).

The SQLite store's change detection (`SqlitePromptStore.subscribe`) used to wake every 20 ms
to ask SQLite whether another process had committed: ~50 wake-ups a second in every gateway
process (every worker of `gateway.workers`), each costing ~80 µs of CPU on this VM, idle or
not. With a watch on the database's directory the thread sleeps until the database or its WAL
is written, and polls fast only for a short while after that (a WAL write is seen before the
commit that follows it completes).

`DirectoryWatch.open` returns None where inotify is not available (not Linux, no libc symbol,
the limit of watches reached): the caller then polls as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
from pathlib import Path

__all__ = ["DirectoryWatch"]

_IN_MODIFY = 0x00000002
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_Q_OVERFLOW = 0x00004000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


def _libc() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.inotify_init1  # noqa: B018 - raises AttributeError where there is none
        lib.inotify_add_watch  # noqa: B018
    except (OSError, AttributeError):
        return None
    return lib


class DirectoryWatch:
    """Writes to the files *names* in one directory, and a way to interrupt the wait."""

    def __init__(self, fd: int, names: frozenset[str]) -> None:
        self._fd = fd
        self._names = names
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()  # not select.select: no limit on the descriptor's number
        self._poll.register(fd, select.POLLIN)
        self._poll.register(self._wake_r, select.POLLIN)
        self.closed = False

    @classmethod
    def open(cls, directory: Path, names: set[str]) -> DirectoryWatch | None:
        lib = _libc()
        if lib is None:
            return None
        fd = int(lib.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        if fd < 0:
            return None
        wd = int(lib.inotify_add_watch(fd, os.fsencode(directory), _IN_MODIFY | _IN_CREATE | _IN_MOVED_TO))
        if wd < 0:
            os.close(fd)
            return None
        return cls(fd, frozenset(names))

    def wait(self, timeout: float) -> bool:
        """Block up to *timeout* seconds (no wake-ups meanwhile). True when one of the files
        was written (or the kernel dropped events, so it may have been); False on timeout or
        after `interrupt`."""
        ready = {fd for fd, _ in self._poll.poll(max(0, int(timeout * 1000)))}
        return self._fd in ready and self._drain()

    def _drain(self) -> bool:
        hit = False
        while True:
            try:
                buf = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return hit
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                return True  # cannot tell: say it may have changed
            at = 0
            while at + _EVENT.size <= len(buf):
                _, mask, _, length = _EVENT.unpack_from(buf, at)
                name = buf[at + _EVENT.size:at + _EVENT.size + length].rstrip(b"\0")
                at += _EVENT.size + length
                if mask & _IN_Q_OVERFLOW or os.fsdecode(name) in self._names:
                    hit = True

    def interrupt(self) -> None:
        """Make a `wait` in another thread return at once."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for fd in (self._fd, self._wake_r, self._wake_w):
                os.close(fd)
