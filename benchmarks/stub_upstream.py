"""A fast OpenAI-compatible stub upstream for gateway-overhead measurements.

    python benchmarks/stub_upstream.py --port 9100 [--hang-shadows]

Answers `POST /v1/chat/completions` at once with a fixed, schema-valid verdict and `GET
/v1/models` with one model; a raw ASGI app on uvicorn (no framework), so it costs far less
per request than the gateway in front of it. With `--hang-shadows`, requests whose
`request_id` marks them as shadow evaluations never get an answer (a hanging shadow target).
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
import uvicorn

VERDICT = '{"decision":"allow","category":"none","confidence":0.93}'
COMPLETION = {
    "id": "stub", "object": "chat.completion", "created": 0, "model": "tiny-llama",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": VERDICT}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1700, "completion_tokens": 20, "total_tokens": 1720,
              "prompt_tokens_details": {"cached_tokens": 1664}},
}
BODY = orjson.dumps(COMPLETION)
MODELS = orjson.dumps({"object": "list", "data": [{"id": "tiny-llama", "object": "model"}]})
HEADERS = [(b"content-type", b"application/json")]


def build_app(hang_shadows: bool, delay_s: float = 0.0):  # type: ignore[no-untyped-def]
    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        if scope["path"].endswith("/models"):
            payload = MODELS
        else:
            if hang_shadows and b"-shadow-" in body:
                await asyncio.sleep(3600)
            if delay_s:
                await asyncio.sleep(delay_s)
            payload = BODY
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*HEADERS, (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--hang-shadows", action="store_true")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds before each answer (a slow engine)")
    ap.add_argument("--keep-alive", type=int, default=5,
                    help="seconds an idle keep-alive connection stays open (uvicorn's default: 5)")
    args = ap.parse_args()
    uvicorn.run(build_app(args.hang_shadows, args.delay), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, http="httptools", loop="uvloop", timeout_keep_alive=args.keep_alive)


if __name__ == "__main__":
    main()
