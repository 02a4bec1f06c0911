"""The CLI's documentation stays true: every `modgate …` example in README.md's shell blocks that
can run on the embedded default configuration is run (against a temporary data directory),
every command answers `-h` and `--help`, and the DuckDB line the README and `--help` show is
run exactly as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from gateway.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

# README examples not run here, each with the reason. Everything else that starts with
# `modgate` in a ```bash block is run and must exit 0. (Matched on the start of the command.)
NOT_RUN: dict[str, str] = {
    "modgate up": "starts Ray Serve + vLLM (the model stack); tests/integration covers it",
    "modgate prompts publish my-prompt.v2.yaml": "needs the user's own prompt file",
    "modgate prompts diff listing-moderation 1 2": "needs a v2, which the shipped registry lacks",
    "modgate prompts label": "moves production; needs v2 and a passing scorecard",
    "modgate prompts rollback": "needs an earlier production version",
    "modgate prompts list / show": "a synopsis of two commands, not one command line",
    "modgate prompts scorecards listing-moderation --version 2": "needs a v2",
    "modgate rollouts start": "needs versions 2 and 3 published",
    "modgate rollouts status listing-moderation --watch": "polls until Ctrl-C",
    "modgate rollouts pause|resume": "a synopsis of several commands",
    "modgate eval run": "calls the model stack",
    "modgate replay": "calls the model stack on recorded traffic (tests/unit/test_replay.py)",
    "modgate eval thresholds": "reads the scorecard `eval run` writes (tests/unit/test_calibration.py "
                               "covers it)",
    "modgate prompts gate-policy diff listing-moderation --file policy.yaml": "needs the user's policy file",
    "modgate prompts gate-policy set": "needs an admin key and a v3",
    "modgate feedback import": "posts to a running gateway with a feedback key "
                               "(tests/unit/test_feedback_import.py covers it)",
    "modgate feedback disagreements": "needs the user's listing content export (--content)",
    "modgate eval validate live.jsonl": "needs the file `feedback disagreements` writes",
    "modgate prompts list --url": "needs a running gateway at that URL and a key "
                                  "(tests/contract/test_remote_cli.py runs the loop against one)",
    "modgate rollouts status listing-moderation --url": "needs a running gateway at that URL",
}


_STACK = {"up", "serving", "gateway"}  # never run by this test, whatever NOT_RUN says


def _shell_blocks(text: str) -> Iterator[str]:
    for m in re.finditer(r"^[ \t]*```(bash|sh|shell|console)\n(.*?)^[ \t]*```", text, re.M | re.S):
        yield m.group(2)


def _commands(block: str) -> Iterator[str]:
    """Command lines of a shell block, continuation lines joined, comments dropped."""
    logical = re.sub(r"\\\n\s*", " ", block)
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"\s*&&\s*", line):
            words = shlex.split(part, comments=True)
            if words:
                yield shlex.join(words)


def readme_commands() -> list[str]:
    return [c for b in _shell_blocks(README.read_text()) for c in _commands(b)]


def _modgate_args(command: str) -> list[str] | None:
    words = shlex.split(command)
    if words and words[0].endswith("modgate"):
        return words[1:]
    return None


def _plain(command: str) -> str:
    """The command as words, `.venv/bin/modgate` spelled `modgate`."""
    words = shlex.split(command)
    if words and words[0].endswith("/modgate"):
        words[0] = "modgate"
    return " ".join(words)


def _skipped(command: str) -> bool:
    return _plain(command).startswith(tuple(NOT_RUN))


@pytest.fixture
def default_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shipped configuration with its data in tmp_path, seeded as `modgate up` seeds it; the
    working directory is a scratch directory where `datasets/` is the repository's."""
    from gateway.cli.main import _open_store
    from gateway.config import load_config

    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp_path / "data")
    config["registry"]["seed_dir"] = str(ROOT / "configs" / "prompts")
    path = tmp_path / "modgate.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    _open_store(cfg).close()
    (cfg.data_path() / cfg.decision_log.dir).mkdir(parents=True)  # a gateway has run: empty log
    work = tmp_path / "work"
    work.mkdir()
    (work / "datasets").symlink_to(ROOT / "datasets")
    monkeypatch.chdir(work)
    monkeypatch.setenv("MODGATE_CONFIG", str(path))
    monkeypatch.setenv("MODGATE_ACTOR", "docs-test")
    return path


def test_readme_has_the_examples_this_test_expects() -> None:
    commands = readme_commands()
    assert any(c.startswith("modgate decisions stats") for c in commands)
    assert any(c.startswith("modgate eval validate datasets/") for c in commands)
    for key in NOT_RUN:  # a stale entry would hide a new example
        assert any(_plain(c).startswith(key) for c in commands), \
            f"NOT_RUN entry {key!r} matches no README example"


def test_readme_modgate_examples_run_on_the_default(default_config: Path) -> None:
    ran = []
    for command in readme_commands():
        args = _modgate_args(command)
        if args is None or _skipped(command):
            continue
        assert args[0] not in _STACK, f"would start the model stack: {command}"
        result = CliRunner().invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, f"README example failed: {command}\n{result.output}"
        ran.append(command)
    assert len(ran) >= 6, ran


def test_readme_duckdb_example_runs_as_written(default_config: Path) -> None:
    """The export, then the DuckDB line exactly as the README shows it (python from the venv)."""
    lines = [c for c in readme_commands() if "duckdb" in c]
    assert lines, "the README shows no DuckDB example"
    assert not any(shlex.split(c)[0] == "duckdb" for c in lines), "there is no duckdb command"
    export = next(c for c in readme_commands() if c.startswith("modgate decisions export"))
    args = _modgate_args(export)
    assert args is not None
    assert CliRunner().invoke(app, args, catch_exceptions=False).exit_code == 0
    for line in lines:
        words = shlex.split(line)
        assert words[0] in ("python", ".venv/bin/python"), line
        done = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True,
                              timeout=120, env={**os.environ})
        assert done.returncode == 0, f"{line}\n{done.stderr}"


def test_export_help_shows_a_duckdb_line_that_runs(default_config: Path) -> None:
    result = CliRunner().invoke(app, ["decisions", "export", "--help"], catch_exceptions=False)
    assert result.exit_code == 0
    assert "duckdb -c" not in " ".join(result.output.split())
    shown = [ln.strip() for ln in result.output.splitlines() if ln.strip().startswith("python -c")]
    assert len(shown) == 1, result.output
    line = shown[0]
    out = Path("out.parquet")
    assert CliRunner().invoke(app, ["decisions", "export", "--out", str(out)],
                              catch_exceptions=False).exit_code == 0
    words = shlex.split(line)
    done = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{line}\n{done.stderr}"


def _all_commands(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in (getattr(cmd, "commands", None) or {}).items():  # typer's own click
        yield from _all_commands(sub, (*path, name))


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_every_command_answers_h_and_help(flag: str) -> None:
    root = typer.main.get_command(app)
    paths = list(_all_commands(root))
    assert len(paths) > 20
    for path in paths:
        result = CliRunner().invoke(app, [*path, flag], catch_exceptions=False)
        assert result.exit_code == 0, f"modgate {' '.join(path)} {flag}: {result.output}"
        assert result.output.startswith("Usage: "), result.output


def test_an_empty_user_is_not_recorded_as_a_person_named_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """`eval run` stores scorecards as actor_name(): with $USER (and the other login variables)
    empty, the account is named as an account, not passed off as who acted."""
    import pwd

    from gateway.cli.eval import actor_name

    for var in ("MODGATE_ACTOR", "LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.setenv(var, "")
    account = pwd.getpwuid(os.getuid()).pw_name
    assert actor_name() == f"uid {os.getuid()} ({account})"
    monkeypatch.setenv("USER", "maria")
    assert actor_name() == "maria"
    monkeypatch.setenv("MODGATE_ACTOR", "release-bot")
    assert actor_name() == "release-bot"
    result = CliRunner().invoke(app, ["eval", "run", "-h"], catch_exceptions=False)
    assert "MODGATE_ACTOR" in result.output


def test_a_missing_metric_is_spelled_one_way_in_these_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """latency and feedback quality print a metric that cannot be computed as `undefined`."""
    import gateway.cli.feedback as feedback_cli
    import gateway.cli.latency as latency_cli

    assert feedback_cli.MISSING == "undefined"
    assert feedback_cli._ci(None, None) == "undefined"

    class Page:
        text = ""

    monkeypatch.setattr(latency_cli.httpx, "get", lambda *a, **k: Page())
    monkeypatch.setattr(latency_cli.time, "sleep", lambda s: None)
    monkeypatch.setattr(latency_cli, "stage_percentiles", lambda a, b: [
        {"stage": "total", "prompt": "p", "version": "1", "arm": "stable", "count": 0,
         "p50_ms": None, "p95_ms": 1.0, "p99_ms": None}])
    result = CliRunner().invoke(app, ["latency", "--window", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    row = result.output.splitlines()[-1].split()
    assert row[-3:] == ["undefined", "1.0", "undefined"] and "-" not in row
