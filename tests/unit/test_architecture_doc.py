"""docs/architecture.md's import picture is the code's, and shows the server apart."""

from __future__ import annotations

from testsupport.import_graph import DOC, SERVER, edges, render_doc


def test_the_picture_is_current() -> None:
    current = DOC.read_text()
    assert render_doc(current) == current, (
        "docs/architecture.md is out of date: run `python -m testsupport.import_graph --write`")


def test_no_arrow_from_the_server_to_the_cli_or_the_quality_tools() -> None:
    found = edges()
    assert ("cli", "quality") in found and ("api", "service") in found  # the scan sees imports
    assert not {(a, b) for a, b in found if a in SERVER and b in ("cli", "quality")}
