"""A realistic moderation workload against the gateway's public HTTP API (`POST /v1/moderate`).

Run it through `benchmarks/run_locust.py --profile NAME` (profiles in profiles.toml), or
directly:

    MODGATE_API_KEY=mgk_... .venv/bin/locust -f benchmarks/locust/locustfile.py --headless \\
        -u 4 -r 2 -t 45s --host http://127.0.0.1:8080 --csv /tmp/lt/run [--mg-zh-share 0.3 ...]

Each request is one marketplace listing built from benchmarks/locust/corpus.yaml:

- locale en-US or zh-CN (`--mg-zh-share`); the prompt's zh-CN variant serves zh-CN;
- compliant or violating-looking (`--mg-violating-share`): a violating listing carries one
  policy category's fragments in its title, its description or both;
- description length in characters drawn from a lognormal distribution (median
  `--mg-desc-median`, shape `--mg-desc-sigma`, clipped to [`--mg-desc-min`, `--mg-desc-max`]);
  title length likewise around `--mg-title-median`. zh-CN lengths are scaled by
  `--mg-zh-char-scale`, since one Chinese character carries about what 2-3 English ones do;
- prompt name drawn from the weighted list `--mg-prompts` (`name=weight,...`; `@default`
  omits the field so the gateway's default prompt serves). Only `listing-moderation` ships:
  publish other prompts before naming them here, or they count as 404 failures;
- seller id (the canary stickiness key) from a population of `--mg-sellers` sellers, Zipf-like
  skewed by `--mg-seller-skew` (0 = uniform; power sellers list more);
- an `x-request-id` on a share of requests (`--mg-request-id-share`); its echo in the body and
  the response header is checked.

Waiting: closed loop with a random think time `--mg-wait MIN,MAX` seconds, or a fixed
request rate per user `--mg-pacing R` (req/s; locust's constant_throughput).

Failures (in locust's stats): any non-200 answer (named by status and error type, e.g.
`429 overloaded`), a 200 without a usable verdict body, or a request id not echoed. A 200
whose verdict is `needs_review` with a `fail_reason` is a success for locust and is counted
in the verdict mix.

The verdict mix (decision, category, arm, fail_reason, prompt version, intent × decision,
sellers seen in more than one arm) and latency histograms (client-measured and the gateway's
own `latency_ms`) ride along locust's worker reports to the master and are written when
locust quits to `<prefix>_verdicts.json` (prefix: `--mg-verdicts-prefix`, else `--csv`), for
benchmarks/summarize_locust.py.

API key: `MODGATE_API_KEY`, else `local-caller` from `--mg-keys-file` (env MODGATE_KEYS_FILE,
default data/local-keys.json, which `modgate up` writes).
"""

from __future__ import annotations

import bisect
import csv
import itertools
import json
import math
import os
import random
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml
from locust import FastHttpUser, between, constant_throughput, events, task
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LOCALES = ("en-US", "zh-CN")


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    g = parser  # (argument groups do not take locust's is_secret / web UI flags)
    g.add_argument("--mg-api-key", default=os.environ.get("MODGATE_API_KEY", ""), is_secret=True,
                   help="caller API key (default: env MODGATE_API_KEY, else --mg-keys-file)")
    g.add_argument("--mg-keys-file", default=os.environ.get("MODGATE_KEYS_FILE",
                                                            str(ROOT / "data" / "local-keys.json")),
                   help="JSON with a 'local-caller' key, as written by `modgate up`")
    g.add_argument("--mg-corpus", default=str(HERE / "corpus.yaml"), help="listing fragments")
    g.add_argument("--mg-prompts", default="listing-moderation=3,@default=1",
                   help="weighted prompt names, name=weight,...; @default omits the field")
    g.add_argument("--mg-zh-share", type=float, default=0.3, help="share of zh-CN listings")
    g.add_argument("--mg-violating-share", type=float, default=0.25,
                   help="share of listings with violating-looking text")
    g.add_argument("--mg-sellers", type=int, default=5000, help="seller id population")
    g.add_argument("--mg-seller-skew", type=float, default=0.8,
                   help="Zipf exponent of seller activity (0 = uniform)")
    g.add_argument("--mg-request-id-share", type=float, default=0.5,
                   help="share of requests sending x-request-id")
    g.add_argument("--mg-desc-median", type=float, default=220, help="median description chars")
    g.add_argument("--mg-desc-sigma", type=float, default=0.9, help="lognormal shape of lengths")
    g.add_argument("--mg-desc-min", type=int, default=20)
    g.add_argument("--mg-desc-max", type=int, default=2000)
    g.add_argument("--mg-title-median", type=float, default=45, help="median title chars")
    g.add_argument("--mg-title-max", type=int, default=150)
    g.add_argument("--mg-zh-char-scale", type=float, default=0.4,
                   help="zh-CN lengths = en-US lengths × this")
    g.add_argument("--mg-wait", default="0,0", help="think time MIN,MAX seconds (closed loop)")
    g.add_argument("--mg-pacing", type=float, default=0.0,
                   help="if > 0: requests per second per user (overrides --mg-wait)")
    g.add_argument("--mg-verdicts-prefix", default="",
                   help="where to write the verdict mix (default: the --csv prefix)")
    g.add_argument("--mg-seed", default="", help="seed for reproducible listings (per user)")


# ---------------------------------------------------------------------------------------------
# Workload model (built once per process at init)


class Workload:
    def __init__(self, opts: Any) -> None:
        self.opts = opts
        self.corpus = yaml.safe_load(Path(opts.mg_corpus).read_text(encoding="utf-8"))
        for loc in LOCALES:
            c = self.corpus.get(loc) or {}
            lists = [("titles.compliant", c["titles"]["compliant"]),
                     ("title_qualifiers", c["title_qualifiers"]),
                     ("sentences.compliant", c["sentences"]["compliant"])]
            lists += [(f"titles.violating.{k}", v) for k, v in c["titles"]["violating"].items()]
            lists += [(f"sentences.violating.{k}", v) for k, v in c["sentences"]["violating"].items()]
            for where, items in lists:
                if not items or not all(isinstance(s, str) and s for s in items):
                    raise ValueError(f"{opts.mg_corpus}: {loc}.{where} must be a list of non-empty "
                                     "strings (quote entries containing ': ')")
        self.prompts, self.prompt_cum = self._weighted(opts.mg_prompts)
        n = max(1, opts.mg_sellers)
        self.seller_cum = list(itertools.accumulate(1.0 / (k + 1) ** opts.mg_seller_skew
                                                    for k in range(n)))
        lo, _, hi = opts.mg_wait.partition(",")
        self.wait = (float(lo or 0), float(hi or lo or 0))
        self.key = opts.mg_api_key or self._key_from_file(Path(opts.mg_keys_file))

    @staticmethod
    def _weighted(spec: str) -> tuple[list[str | None], list[float]]:
        names: list[str | None] = []
        weights: list[float] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, w = part.partition("=")
            names.append(None if name == "@default" else name)
            weights.append(float(w or 1))
        if not names:
            raise ValueError("--mg-prompts is empty")
        return names, list(itertools.accumulate(weights))

    @staticmethod
    def _key_from_file(path: Path) -> str:
        try:
            return str(json.loads(path.read_text())["local-caller"])
        except (OSError, ValueError, KeyError):
            return ""

    # -- drawing -----------------------------------------------------------------------------

    @staticmethod
    def _pick_cum(rng: random.Random, items: list[Any], cum: list[float]) -> Any:
        return items[min(len(items) - 1, bisect.bisect_right(cum, rng.random() * cum[-1]))]

    def _length(self, rng: random.Random, median: float, sigma: float, lo: float, hi: float) -> int:
        return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))

    def listing(self, rng: random.Random) -> tuple[dict[str, Any], str]:
        """One request body, and its intent (`compliant` or `violating:<category>`)."""
        o = self.opts
        locale = "zh-CN" if rng.random() < o.mg_zh_share else "en-US"
        c = self.corpus[locale]
        scale = o.mg_zh_char_scale if locale == "zh-CN" else 1.0
        sep = "" if locale == "zh-CN" else " "

        category = None
        in_title = in_desc = False
        if rng.random() < o.mg_violating_share:
            category = rng.choice(sorted(c["sentences"]["violating"]))
            where = rng.random()
            in_title, in_desc = where < 0.5, where >= 0.25  # 25% title, 50% description, 25% both
            if category not in c["titles"]["violating"]:
                in_title, in_desc = False, True

        # title: a base title, then qualifiers up to the drawn length
        title = rng.choice(c["titles"]["violating"][category] if in_title else c["titles"]["compliant"])
        t_len = self._length(rng, o.mg_title_median * scale, 0.5, 4, o.mg_title_max * scale)
        quals = list(c["title_qualifiers"])
        rng.shuffle(quals)
        for q in quals:
            if len(title) >= t_len:
                break
            title = f"{title} {q}"

        # description: compliant sentences up to the drawn length, violating fragments inserted
        d_len = self._length(rng, o.mg_desc_median * scale, o.mg_desc_sigma,
                             max(1, o.mg_desc_min * scale), o.mg_desc_max * scale)
        frags = []
        if in_desc:
            pool = c["sentences"]["violating"][category]
            frags = rng.sample(pool, min(len(pool), 1 if rng.random() < 0.7 else 2))
        budget = d_len - sum(len(f) + len(sep) for f in frags)
        filler: list[str] = []
        sentences = c["sentences"]["compliant"]
        while budget > 0:
            s = rng.choice(sentences)
            if len(s) + len(sep) > budget:
                s = s[:budget].rstrip()  # the last sentence is cut to the drawn length
            if s:
                filler.append(s)
            budget -= len(s) + len(sep)
            if len(s) == 0:
                break
        pieces = list(filler)
        for f in frags:
            pieces.insert(rng.randint(0, len(pieces)), f)
        description = sep.join(pieces)

        body: dict[str, Any] = {
            "item_id": f"item-{rng.getrandbits(40):012x}",
            "seller_id": f"seller-{self._pick_cum(rng, range(len(self.seller_cum)), self.seller_cum):06d}",
            "title": title[:500],
            "description": description,
            "locale": locale,
        }
        prompt = self._pick_cum(rng, self.prompts, self.prompt_cum)
        if prompt is not None:
            body["prompt"] = prompt
        return body, (f"violating:{category}" if category else "compliant")


WORKLOAD: Workload | None = None
ENV: Any = None


# ---------------------------------------------------------------------------------------------
# Verdict mix and latency histograms (per process; written at test stop)


class Tally:
    """Verdict mix and latency histograms of this process. Workers (--processes or remote)
    send what they gathered since their last report to the master with locust's own stats
    reports, and start over; the master (or a local runner) holds the totals."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.c: dict[str, Counter[str]] = defaultdict(Counter)
        self.client_ms: Counter[str] = Counter()
        self.gateway_ms: Counter[str] = Counter()
        self.seller_arms: dict[str, set[str]] = defaultdict(set)

    def delta(self) -> dict[str, Any]:
        out = {"counts": {k: dict(v) for k, v in self.c.items()}, "client_ms": dict(self.client_ms),
               "gateway_ms": dict(self.gateway_ms),
               "seller_arms": {k: sorted(v) for k, v in self.seller_arms.items()}}
        self.reset()
        return out

    def merge(self, d: dict[str, Any]) -> None:
        for dim, c in d.get("counts", {}).items():
            self.c[dim].update(c)
        self.client_ms.update(d.get("client_ms", {}))
        self.gateway_ms.update(d.get("gateway_ms", {}))
        for seller, arms in d.get("seller_arms", {}).items():
            self.seller_arms[seller].update(arms)

    def to_json(self) -> dict[str, Any]:
        multi = sum(1 for arms in self.seller_arms.values() if len(arms) > 1)
        return {
            "written": time.time(),
            "counts": {k: dict(v.most_common()) for k, v in self.c.items()},
            "client_latency_ms_hist": {k: self.client_ms[k] for k in sorted(self.client_ms, key=int)},
            "gateway_latency_ms_hist": {k: self.gateway_ms[k] for k in sorted(self.gateway_ms, key=int)},
            "sellers_seen": len(self.seller_arms),
            "sellers_in_several_arm_versions": multi,
        }


TALLY = Tally()


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    global WORKLOAD, ENV
    ENV = environment
    if isinstance(environment.runner, MasterRunner) or environment.parsed_options is None:
        return
    WORKLOAD = Workload(environment.parsed_options)


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    TALLY.reset()
    if WORKLOAD is not None and not WORKLOAD.key:
        raise RuntimeError("no API key: set MODGATE_API_KEY or --mg-keys-file (modgate up writes "
                           "data/local-keys.json)")


@events.report_to_master.add_listener
def _on_report_to_master(client_id: str, data: dict[str, Any], **_: Any) -> None:
    data["modgate_tally"] = TALLY.delta()


@events.worker_report.add_listener
def _on_worker_report(client_id: str, data: dict[str, Any], **_: Any) -> None:
    if "modgate_tally" in data:
        TALLY.merge(data["modgate_tally"])


@events.quit.add_listener
def _on_quit(**_: Any) -> None:
    """After the runner has quit (workers' final reports are in): write the verdict mix to
    `<prefix>_verdicts.json`, and the final totals to `<csv>_stats_final.csv` and
    `<csv>_failures_final.csv` (locust's own columns): locust rewrites its --csv files once a
    second, so they can miss the end of the run. summarize_locust.py prefers the final ones."""
    env = ENV
    if env is None or isinstance(env.runner, WorkerRunner) or env.parsed_options is None:
        return
    opts = env.parsed_options
    prefix = opts.mg_verdicts_prefix or opts.csv_prefix
    if prefix:
        path = Path(f"{prefix}_verdicts.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(TALLY.to_json(), indent=1, ensure_ascii=False) + "\n")
    if opts.csv_prefix:
        writer = StatsCSV(env, PERCENTILES_TO_REPORT)
        with open(f"{opts.csv_prefix}_stats_final.csv", "w", newline="", encoding="utf-8") as fh:
            writer.requests_csv(csv.writer(fh))
        with open(f"{opts.csv_prefix}_failures_final.csv", "w", newline="", encoding="utf-8") as fh:
            writer.failures_csv(csv.writer(fh))


# ---------------------------------------------------------------------------------------------


class ModerationUser(FastHttpUser):
    network_timeout = 90.0
    connection_timeout = 10.0
    _serial = itertools.count()

    def on_start(self) -> None:
        assert WORKLOAD is not None
        opts = WORKLOAD.opts
        n = next(self._serial)
        seed = f"{opts.mg_seed}-{os.getpid()}-{n}" if opts.mg_seed else None
        self.rng = random.Random(seed) if seed else random.Random(random.SystemRandom().getrandbits(64))
        self._wait = (constant_throughput(opts.mg_pacing) if opts.mg_pacing > 0
                      else between(*WORKLOAD.wait))
        self.headers = {"authorization": f"Bearer {WORKLOAD.key}", "content-type": "application/json"}

    def wait_time(self) -> float:
        return self._wait(self)

    @task
    def moderate(self) -> None:
        assert WORKLOAD is not None
        body, intent = WORKLOAD.listing(self.rng)
        headers = dict(self.headers)
        rid = None
        if self.rng.random() < WORKLOAD.opts.mg_request_id_share:
            rid = f"lt-{uuid.UUID(int=self.rng.getrandbits(128)).hex}"
            headers["x-request-id"] = rid
        c = TALLY.c
        with self.client.post("/v1/moderate", data=json.dumps(body, ensure_ascii=False).encode(),
                              headers=headers, name=f"/v1/moderate [{body['locale']}]",
                              catch_response=True) as resp:
            TALLY.client_ms[str(int(resp.request_meta["response_time"]))] += 1
            status = resp.status_code
            try:
                data = resp.json() if resp.content else None
            except ValueError:
                data = None
            if status != 200:
                etype = (data or {}).get("error", {}).get("type", "no_json") if isinstance(data, dict) else "no_json"
                c["errors"][f"{status} {etype}"] += 1
                resp.failure(f"{status} {etype}")
                return
            if not isinstance(data, dict) or "decision" not in data or "prompt" not in data:
                c["errors"]["200 unusable_body"] += 1
                resp.failure("200 without a verdict body")
                return
            if rid is not None and (data.get("request_id") != rid or resp.headers.get("x-request-id") != rid):
                c["errors"]["request_id_not_echoed"] += 1
                resp.failure("x-request-id not echoed")
                return
            resp.success()
            decision, category, arm = data["decision"], data.get("category"), data.get("arm", "?")
            p = data["prompt"]
            c["decision"][decision] += 1
            c["category"][str(category)] += 1
            c["arm"][arm] += 1
            c["fail_reason"][str(data.get("fail_reason"))] += 1
            c["prompt_version"][f"{p.get('name')} v{p.get('version')} ({p.get('label')})"] += 1
            c["locale_variant"][f"{body['locale']} -> {p.get('locale')}"] += 1
            c["intent_decision"][f"{intent.split(':')[0]} -> {decision}"] += 1
            c["intent_category"][f"{intent} -> {decision}/{category}"] += 1
            if p.get("stale"):
                c["stale"]["true"] += 1
            if isinstance(data.get("latency_ms"), int | float):
                TALLY.gateway_ms[str(int(data["latency_ms"]))] += 1
            TALLY.seller_arms[body["seller_id"]].add(f"{arm}:v{p.get('version')}")
