"""The `modgate` command line. Not imported by the server (checked by the boundary test)."""

from gateway.cli.main import main

__all__ = ["main"]
