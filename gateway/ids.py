"""Request ids: 128 random bits as 32 hex digits (the shape of `uuid.uuid4().hex`).

The bits come from `os.urandom` taken 4 KiB at a time, so one system call serves 256 ids.
`uuid.uuid4()` makes a `getrandom()` call per id, and CPython releases the GIL around it: on
the request path every id handed the GIL to whichever thread wanted it (the span exporter, the
decision-log writer) and queued the event loop behind it. A profile of the gateway at ~1,500
requests/s had ~5 % of its samples there.
"""

from __future__ import annotations

import os
import threading

__all__ = ["new_id"]

_BLOCK = 4096
_lock = threading.Lock()
_buf = b""
_pos = 0


def new_id() -> str:
    """32 lower-case hex digits, cryptographically random, never repeated within a process."""
    global _buf, _pos
    with _lock:
        if _pos + 16 > len(_buf):
            _buf, _pos = os.urandom(_BLOCK), 0
        chunk = _buf[_pos:_pos + 16]
        _pos += 16
    return chunk.hex()


def _forget_after_fork() -> None:  # a forked worker must not hand out its parent's next ids
    global _buf, _pos, _lock
    _buf, _pos, _lock = b"", 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
