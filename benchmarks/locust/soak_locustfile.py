"""The soak workload: benchmarks/locust/locustfile.py's moderation workload, plus one line per
`/v1/moderate` answer written to `--soak-answers` (JSON lines), so benchmarks/soak.py can match
every answered request against the decision log by request id.

Run it through `benchmarks/soak.py`; by hand:

    MODGATE_API_KEY=mgk_... .venv/bin/locust -f benchmarks/locust/soak_locustfile.py --headless \\
        -u 4 -r 4 -t 60s --host http://127.0.0.1:8080 --mg-pacing 1 --mg-request-id-share 1 \\
        --soak-answers /tmp/answers.jsonl

Each line: `{"t": unix time the answer was recorded, "status": HTTP status (0: no answer, e.g. a
connection error or a client timeout), "rid": request id from the answer (the `x-request-id`
header, else the JSON body's `request_id`; null when the answer has neither), "ms": response
time, "failed": locust counted it as a failure}`. Only the local runner writes (no
`--processes`): a soak at a few requests per second needs one locust process.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import IO, Any

from locust import events

HERE = Path(__file__).resolve().parent

# The workload, its options and its listeners come from the main locustfile, loaded by path
# (not by module name, which another `locustfile` on sys.path could shadow).
_spec = importlib.util.spec_from_file_location("modgate_locustfile", HERE / "locustfile.py")
assert _spec is not None and _spec.loader is not None
_workload = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_workload)
ModerationUser = _workload.ModerationUser  # locust collects User classes from this module

_OUT: IO[str] | None = None


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument("--soak-answers", default="",
                        help="append one JSON line per /v1/moderate answer to this file")


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    global _OUT
    opts = environment.parsed_options
    if _OUT is None and opts is not None and opts.soak_answers:
        _OUT = open(opts.soak_answers, "a", encoding="utf-8", buffering=1)  # line-buffered


@events.request.add_listener
def _on_request(name: str, response_time: float, response: Any = None, exception: Any = None,
                **_: Any) -> None:
    if _OUT is None or not name.startswith("/v1/moderate"):
        return
    status = int(getattr(response, "status_code", 0) or 0)
    rid = None
    if status:
        headers = getattr(response, "headers", None) or {}
        rid = headers.get("x-request-id")
        if not rid:
            try:
                body = response.json()
                rid = body.get("request_id") if isinstance(body, dict) else None
            except Exception:  # any unreadable body: no request id
                rid = None
    _OUT.write(json.dumps({"t": round(time.time(), 3), "status": status, "rid": rid,
                           "ms": round(float(response_time or 0), 1),
                           "failed": exception is not None}) + "\n")


@events.quit.add_listener
def _on_quit(**_: Any) -> None:
    global _OUT
    if _OUT is not None:
        _OUT.close()
        _OUT = None
