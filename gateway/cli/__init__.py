"""The `modgate` command line. Not imported by the server (checked by the boundary test)."""

__all__ = ["main"]


def main() -> None:
    """The `modgate` entry point (imported lazily, so `python -m gateway.cli.main` runs clean)."""
    from gateway.cli.main import main as run

    run()
