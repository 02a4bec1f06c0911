"""Offline evaluation of prompt versions on labelled datasets (`modgate eval ...`).

- `dataset`: labelled rows, JSONL/CSV, validation with file:line:field problems, dataset hash.
- `runner`: renders each (version, row) exactly like production, calls the backend with bounded
  concurrency, and caches answers on disk so re-runs only compute what is missing.
- `scorecard`: per-category precision/recall/F1 with Wilson intervals, confusion matrix,
  per-locale breakdown, rates, latency and tokens; `compare` with exact McNemar tests.
- `report`: Markdown reports and PNG plots.

Submodules are imported on use: statsmodels and matplotlib are only loaded for scorecards and
plots.
"""
