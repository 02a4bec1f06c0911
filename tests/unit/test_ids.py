"""gateway/ids.py: request ids drawn from os.urandom in blocks."""

from __future__ import annotations

import multiprocessing
import re

from gateway.ids import new_id


def test_ids_are_32_hex_digits_and_never_repeat() -> None:
    ids = [new_id() for _ in range(5000)]  # ~20 refills of the 4 KiB block
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def _child(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put(new_id())


def test_a_forked_process_does_not_repeat_its_parents_next_ids() -> None:
    new_id()  # the parent holds a partly used block
    queue: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()  # type: ignore[type-arg]
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(queue,))
    proc.start()
    child_id = queue.get(timeout=30)
    proc.join(timeout=30)
    assert child_id not in {new_id() for _ in range(300)}
