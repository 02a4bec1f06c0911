"""Evaluation outputs (per-item CSV and Parquet, the run summary, the self-contained HTML report,
`eval report`) and the HTML reports rendered by headless Chromium (a screenshot test)."""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import gateway.cli.eval as eval_cli
from gateway.quality.evaluation.dataset import load_dataset
from gateway.quality.evaluation.report import ITEM_COLUMNS, item_rows
from gateway.quality.evaluation.scorecard import Scorecard, build_scorecard
from gateway.quality.ops_report import build_report, write_ops_report
from prompt_registry import PromptSpec
from tests.unit.test_evaluation import SAMPLE, CountingBackend, _oracle, _small_results, _version
from tests.unit.test_ops_report import T0, _labels, _records

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "listing-moderation"
IMAGE_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, example_spec: PromptSpec) -> Iterator[dict[str, Any]]:
    """`modgate eval run` of v1 and v2 on the shipped sample, with a fake model that answers the
    gold label except on a stable share of items (30% for v1, 10% for v2)."""
    from gateway.config import load_config
    from gateway.stores import open_store
    from prompt_registry.loader import seed_store

    tmp = tmp_path_factory.mktemp("eval")
    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp / "data")
    config["registry"]["seed_dir"] = str(ROOT / "configs" / "prompts")
    path = tmp / "modgate.yaml"
    path.write_text(yaml.safe_dump(config))
    store = open_store(load_config(path))
    try:
        seed_store(store, ROOT / "configs" / "prompts")
        store.publish(_version(example_spec, 2, marker="STRICT").spec, actor="test")
    finally:
        store.close()

    def make(cfg: object) -> CountingBackend:
        b = CountingBackend()
        b.responder = _oracle({"v1": 0.3, "v2": 0.1})
        return b

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eval_cli, "make_backend", make)
        result = CliRunner().invoke(eval_cli.eval_app, [
            "run", "--config", str(path), "--prompt", PROMPT, "-v", "1", "-v", "2", "--dataset",
            str(SAMPLE), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # stderr: progress and registry notes
    yield {"config": path, "out": Path(summary["out_dir"]), "summary": summary}


# -- per-item results --------------------------------------------------------------------------


def test_item_rows_match_the_hand_computed_example(example_spec: PromptSpec, tmp_path: Path) -> None:
    version, ds, results = _small_results(example_spec, 1, tmp_path)
    rows = {r["item_id"]: r for r in item_rows(build_scorecard(version, ds, results), ds)}
    assert [i for i, r in rows.items() if r["correct"]] == ["r1", "r3", "r5", "r10"]
    assert (rows["r7"]["decision"], rows["r7"]["fail_reason"], rows["r7"]["predicted_label"]) == (
        "needs_review", "unparseable_output", "needs_review")
    assert (rows["r9"]["decision"], rows["r9"]["error_type"], rows["r9"]["predicted_label"]) == (
        None, "BackendUnavailable", "error")
    assert rows["r2"]["title"] == "title-r2:" and rows["r2"]["gold_label"] == "counterfeit"
    assert list(rows["r1"]) == list(ITEM_COLUMNS)


def test_eval_run_writes_per_item_csv_and_parquet(evaluated: dict[str, Any]) -> None:
    out: Path = evaluated["out"]
    dataset = load_dataset(SAMPLE)
    paths = evaluated["summary"]["scorecards"][1]["paths"]
    assert Path(paths["items_csv"]) == out / "v2-items.csv"
    sc = Scorecard.from_dict(json.loads((out / "v2.json").read_text(encoding="utf-8")))
    parquet = str(out / "v2-items.parquet")
    assert duckdb.sql(f"select count(*), sum(correct::int) from '{parquet}'").fetchall() == [(
        len(dataset), sc.overall.correct)]
    types = dict(duckdb.sql(f"select column_name, column_type from (describe '{parquet}')").fetchall())
    assert (types["correct"], types["confidence"], types["version"], types["tags"]) == (
        "BOOLEAN", "DOUBLE", "BIGINT", "VARCHAR[]")
    both = duckdb.sql(f"select count(*) from '{out}/v*-items.parquet' group by version order by version").fetchall()
    assert both == [(len(dataset),), (len(dataset),)]
    raw = (out / "v2-items.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # spreadsheets read the CJK titles correctly
    with (out / "v2-items.csv").open(encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == ITEM_COLUMNS and len(rows) == len(dataset)
    zh = next(r for r in dataset.rows if r.locale == "zh-CN")
    row = next(r for r in rows if r["item_id"] == zh.item_id)
    assert row["title"] == zh.title and row["tags"] == ";".join(zh.tags)
    assert {r["correct"] for r in rows} == {"true", "false"}


def test_eval_run_writes_the_summary_and_a_self_contained_html_report(evaluated: dict[str, Any]) -> None:
    out: Path = evaluated["out"]
    report = evaluated["summary"]["report"]
    assert Path(report["html"]) == out / "report-v1-v2.html"
    md = (out / "report-v1-v2.md").read_text(encoding="utf-8")
    for text in ("# Evaluation: listing-moderation v1, v2", "## Versions",
                 "## Per category: precision and recall", "precision v2", "## Comparisons",
                 "fixed**", "exact McNemar p"):
        assert text in md, text
    page = (out / "report-v1-v2.html").read_text(encoding="utf-8")
    images = IMAGE_URI.findall(page)
    assert len(images) == 9  # v1 and v2: precision/recall, confusion, reliability, coverage; the comparison
    for data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG")
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing to fetch
    for anchor in ('id="summary"', 'id="compare-v1-v2"', 'id="v1"', 'id="v2"'):
        assert anchor in page
    assert "Confusion matrix (outcome labels)" in page and "<table>" in page


def test_eval_report_rewrites_everything_from_stored_scorecards(evaluated: dict[str, Any]) -> None:
    out: Path = evaluated["out"]
    before = (out / "report-v1-v2.md").read_text(encoding="utf-8")
    for name in ("report-v1-v2.html", "report-v1-v2.md", "v1-items.csv", "v2-items.parquet",
                 "compare-v1-v2-pr.png"):
        (out / name).unlink()
    args = ["report", "--config", str(evaluated["config"]), "--prompt", PROMPT, "-v", "1", "-v", "2",
            "--dataset", str(SAMPLE)]
    r = CliRunner().invoke(eval_cli.eval_app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "McNemar exact p" in r.output and "report-v1-v2.html" in r.output
    assert (out / "report-v1-v2.md").read_text(encoding="utf-8") == before
    for name in ("report-v1-v2.html", "v1-items.csv", "v2-items.parquet", "compare-v1-v2-pr.png"):
        assert (out / name).stat().st_size > 0
    r = CliRunner().invoke(eval_cli.eval_app, [*args[:-4], "-v", "7", "--dataset", str(SAMPLE)])
    assert r.exit_code == 2
    assert f"no scorecard for {PROMPT} v7 on this dataset" in r.output and "eval run" in r.output


# -- rendering in headless Chromium ------------------------------------------------------------

WIDTH, HEIGHT = 1280, 4000
# Injected into a copy of the page: after load, record every image's decoded size, position and
# how many colours its decoded pixels have (drawn on a small canvas), wherever it is on the page.
PROBE = """<script>
function colours(img) {
  const c = document.createElement('canvas'); c.width = 160; c.height = 120;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0, 160, 120);
  const d = g.getImageData(0, 0, 160, 120).data; const seen = new Set();
  for (let k = 0; k < d.length; k += 4) seen.add(d[k] * 16777216 + d[k+1] * 65536 + d[k+2] * 256 + d[k+3]);
  return seen.size;
}
window.addEventListener('load', () => document.body.setAttribute('data-probe', JSON.stringify(
  [...document.images].map(i => { const r = i.getBoundingClientRect();
    return {w: i.naturalWidth, h: i.naturalHeight, x: r.left + scrollX, y: r.top + scrollY,
            cw: r.width, ch: r.height, colours: i.naturalWidth ? colours(i) : 0}; }))));
</script>"""


def _chromium() -> str:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium not found (chromium-headless-shell or chromium on PATH): run "
                "./scripts/bootstrap, which installs Debian's chromium-headless-shell, or "
                "`sudo apt-get install chromium-headless-shell`")


def _browser(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [_chromium(), "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--window-size={WIDTH},{HEIGHT}", *args]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # Chromium refuses to sandbox as root
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def render_problems(page: Path, work: Path) -> list[str]:
    """Open *page* in headless Chromium; every reason its plots do not show (empty: they do)."""
    probe = work / f"{page.stem}.probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                     encoding="utf-8")
    dom = _browser("--dump-dom", probe.as_uri())
    found = re.search(r'data-probe="([^"]*)"', dom.stdout)
    if found is None:
        return [f"the page did not load in Chromium (exit {dom.returncode}): {dom.stderr[-500:]}"]
    images = json.loads(html.unescape(found.group(1)))
    shot_path = work / f"{page.stem}.png"
    shot = _browser(f"--screenshot={shot_path}", page.as_uri())
    if not shot_path.is_file():
        return [f"no screenshot (exit {shot.returncode}): {shot.stderr[-500:]}"]
    rgb = np.asarray(Image.open(shot_path).convert("RGB"), dtype=np.int32)
    pixels = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # one int per pixel
    problems = []
    if rgb.std() < 5:
        problems.append("the screenshot is blank")
    if not images:
        problems.append("the page has no images")
    on_screen = 0
    for n, img in enumerate(images):
        if img["w"] == 0 or img["h"] == 0:
            problems.append(f"image {n} did not load (naturalWidth {img['w']})")
            continue
        if img["colours"] < 20:
            problems.append(f"image {n} has no picture (its pixels have {img['colours']} colours)")
            continue
        x, y, w, h = (round(img[k]) for k in ("x", "y", "cw", "ch"))
        if y + h > HEIGHT:
            continue  # below the screenshot; its decoding was checked above
        on_screen += 1
        region = rgb[y:y + h, x:x + w]
        colours = len(np.unique(pixels[y:y + h, x:x + w]))
        if region.size == 0 or region.std() < 10 or colours < 20:
            problems.append(f"image {n} shows nothing on screen (std {region.std():.1f}, "
                            f"{colours} colours)")
    if images and not on_screen:
        problems.append("no image within the screenshot")
    return problems


@pytest.fixture(scope="module")
def ops_html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rep = build_report(_records(), _labels(), start=T0, end=T0 + timedelta(hours=1))
    return write_ops_report(rep, tmp_path_factory.mktemp("ops"))["html"]


@pytest.mark.parametrize("which", ["eval", "ops"])
def test_html_reports_render_in_headless_chromium(which: str, request: pytest.FixtureRequest,
                                                  tmp_path: Path) -> None:
    if which == "eval":
        page = request.getfixturevalue("evaluated")["out"] / "report-v1-v2.html"
    else:
        page = request.getfixturevalue("ops_html")
    assert render_problems(page, tmp_path) == []


def test_the_render_check_fails_on_broken_images(ops_html: Path, tmp_path: Path) -> None:
    text = ops_html.read_text(encoding="utf-8")
    first, second = [m.group(1) for m in IMAGE_URI.finditer(text)][:2]
    # The first image is not a PNG at all; the second is cut short: the browser reads its size
    # from the header but has no pixels to draw.
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace(first, "iVBORw0KGgoAAAAAAAAA" + first[-40:], 1)
                      .replace(second, second[:400], 1), encoding="utf-8")
    problems = render_problems(broken, tmp_path)
    assert len(problems) == 2, problems
    assert problems[0] == "image 0 did not load (naturalWidth 0)"
    assert problems[1].startswith("image 1 has no picture")
