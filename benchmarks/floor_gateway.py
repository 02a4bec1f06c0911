"""The floor: the least a Python moderation gateway can do per request, to measure modgate against.

    python benchmarks/floor_gateway.py --port 9200 --upstream http://127.0.0.1:9100/v1 \
        [--prompt configs/prompts/listing-moderation.yaml]

`POST /v1/moderate` takes the same listing body as modgate's, validates it with a pydantic model,
renders the shipped prompt's messages in a sandboxed Jinja2 environment (StrictUndefined, the
same `json` filter the prompt uses), sends one chat completion to the upstream over a pooled
aiohttp session, reads the verdict from the answer with orjson (an answer that is not a known
decision becomes `needs_review`) and answers with orjson. FastAPI on uvicorn with uvloop and
httptools. Nothing else: no authentication, registry, rollouts, admission control, metrics,
tracing or decision log. `benchmarks/overhead.py` runs it as its `floor` row, under the same
pinning as every scenario, so each scenario's throughput is a ratio to this and its latency a
difference from this, both measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvicorn
import yaml
from fastapi import FastAPI, Request
from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

ROOT = Path(__file__).resolve().parents[1]
_ID = r"^[A-Za-z0-9._:-]{1,128}$"


class Listing(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(..., pattern=_ID)
    seller_id: str | None = Field(None, pattern=_ID)
    title: str = Field(..., min_length=1)
    description: str = ""
    locale: str | None = None


def _json_string(value: object) -> str:
    return orjson.dumps(value if isinstance(value, str) else str(value)).decode()


def build_app(prompt_file: Path, upstream: str) -> FastAPI:
    spec = yaml.safe_load(prompt_file.read_text(encoding="utf-8"))
    env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.filters["json"] = _json_string
    default_locale = spec.get("default_locale", "en-US")
    variants = {default_locale: spec["messages"],
                **{loc: v["messages"] for loc, v in (spec.get("locales") or {}).items()}}
    templates = {loc: [(m["role"], env.from_string(m["content"])) for m in msgs] for loc, msgs in variants.items()}
    decisions = frozenset(spec["verdict"]["decisions"])
    sampling = spec.get("sampling") or {}
    url = upstream.rstrip("/") + "/chat/completions"
    ids = itertools.count()
    state: dict[str, aiohttp.ClientSession] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256),
                                                 headers={"content-type": "application/json"})
        yield
        await state["session"].close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/moderate")
    async def moderate(request: Request) -> Response:
        try:
            listing = Listing.model_validate_json(await request.body())
        except ValidationError as exc:
            return Response(orjson.dumps({"error": exc.errors(include_url=False, include_context=False)}),
                            status_code=422, media_type="application/json")
        locale = listing.locale if listing.locale in templates else default_locale
        values = {"title": listing.title, "description": listing.description, "locale": locale}
        messages = [{"role": role, "content": t.render(values)} for role, t in templates[locale]]
        rid = f"floor-{next(ids)}"
        body = {"model": spec["model"], "messages": messages, "max_tokens": sampling.get("max_tokens", 96),
                "temperature": sampling.get("temperature", 0.0), "stream": False, "request_id": rid}
        async with state["session"].post(url, data=orjson.dumps(body)) as resp:
            raw = await resp.read()
            status = resp.status
        if status != 200:
            return Response(orjson.dumps({"error": f"upstream answered {status}"}), status_code=502,
                            media_type="application/json")
        completion = orjson.loads(raw)
        verdict: dict[str, Any]
        try:
            verdict = orjson.loads(completion["choices"][0]["message"]["content"])
            if verdict.get("decision") not in decisions:
                raise ValueError("unknown decision")
        except (ValueError, KeyError, IndexError, TypeError):
            verdict = {"decision": "needs_review", "category": None, "confidence": None}
        usage = completion.get("usage") or {}
        return Response(orjson.dumps({
            "request_id": rid, "item_id": listing.item_id, "decision": verdict["decision"],
            "category": verdict.get("category"), "confidence": verdict.get("confidence"),
            "model": completion.get("model"),
            "usage": {"prompt_tokens": usage.get("prompt_tokens"),
                      "completion_tokens": usage.get("completion_tokens")}}),
            media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:9100/v1")
    ap.add_argument("--prompt", type=Path, default=ROOT / "configs" / "prompts" / "listing-moderation.yaml")
    args = ap.parse_args()
    uvicorn.run(build_app(args.prompt, args.upstream), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, http="httptools", loop="uvloop")


if __name__ == "__main__":
    main()
