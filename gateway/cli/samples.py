"""`modgate samples ...`: the listing-content sample store on this host (`gateway.samples`).

    modgate samples stats
    modgate samples delete ITEM_ID
    modgate samples purge            # rows past samples.retention_days
    modgate samples purge --all      # every row

These open the store file the configuration names (`samples.path` under `data_dir`) directly,
as an operator on the gateway host, and work whether or not `samples.enabled` is on now: turning
sampling off stops new rows, and rows kept earlier stay until they are purged or deleted here.
Over HTTP, `DELETE /v1/admin/samples/{item_id}` (scope `samples:delete`) does the same as
`delete`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gateway.cli.eval import _config, _fail
from gateway.config import AppConfig

if TYPE_CHECKING:
    from gateway.samples import SampleStore

__all__ = ["sample_listings", "samples_app"]

samples_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                          help="The listing-content sample store (opt-in, retention-limited): "
                               "counts, delete one item's content, purge expired rows.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", envvar="MODGATE_CONFIG",
                                               help="configuration file (default: configs/modgate.yaml)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
ITEM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"



def _store(cfg: AppConfig) -> tuple[SampleStore | None, str]:
    """The store (None when sampling never kept anything here) and where it is."""
    from gateway.samples import open_configured, sample_store_path

    where = (f"Redis ({cfg.registry.redis_key_prefix}:samples:*)" if cfg.samples.store == "redis"
             else str(sample_store_path(cfg.samples, cfg.data_path())))
    try:
        return open_configured(cfg, cleanup=True), where
    except ValueError as exc:
        raise _fail(str(exc), 2) from None


def sample_listings(cfg: AppConfig, item_ids: Iterable[str]) -> dict[str, Any]:
    """Listing content for *item_ids* from the sample store (the newest row of each item), as
    `gateway.quality.disagreements.ListingContent`; empty when there is no store file. For the
    CLI's exports (`feedback disagreements`), run by an operator on the host."""
    from gateway.quality.disagreements import ListingContent

    store, _ = _store(cfg)
    if store is None:
        return {}
    try:
        rows = store.by_item(item_ids)
    finally:
        store.close()
    return {item: ListingContent(item_id=item, title=s.content.get("title", ""),
                                 description=s.content.get("description", ""), locale=s.locale,
                                 seller_id=s.content.get("seller_id", ""))
            for item, s in rows.items() if s.content.get("title")}


def _out(data: dict[str, object], text: str, as_json: bool) -> None:
    typer.echo(json.dumps(data) if as_json else text)


@samples_app.command("stats")
def stats(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Whether sampling is on, the share and retention, and how many live rows the store has."""
    cfg = _config(config)
    store, path = _store(cfg)
    rows = 0 if store is None else store.count()
    s = cfg.samples
    data: dict[str, object] = {"enabled": s.enabled, "share": s.share, "retention_days": s.retention_days,
                               "store": s.store, "path": path, "rows": rows}
    _out(data, f"samples: {'on' if s.enabled else 'off'} (share {s.share:g}, retention "
               f"{s.retention_days:g} days); {rows} live rows in {path}"
               + ("" if store is not None else " (no store file)"), as_json)
    if store is not None:
        store.close()


@samples_app.command("delete")
def delete(item_id: Annotated[str, typer.Argument(help="the listing's item id")],
           config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Delete every stored row (content and verdict) of one item. Deleting an item that has
    none is not an error (it answers 0)."""
    import re

    if not re.match(ITEM_ID_PATTERN, item_id):
        raise _fail(f"{item_id!r} is not an item id (1-128 characters of [A-Za-z0-9._:-])", 2)
    cfg = _config(config)
    store, path = _store(cfg)
    deleted = 0 if store is None else store.delete_item(item_id)
    if store is not None:
        store.close()
    _out({"item_id": item_id, "deleted": deleted, "path": path},
         f"deleted {deleted} row(s) of item {item_id} from {path}", as_json)


@samples_app.command("purge")
def purge(everything: Annotated[bool, typer.Option("--all", help="delete every row, not only "
                                                   "expired ones")] = False,
          config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Delete rows older than samples.retention_days (the gateway does this on its own while
    sampling is on; this is for a store left behind, or to purge at once)."""
    cfg = _config(config)
    store, path = _store(cfg)
    deleted = 0 if store is None else store.purge(everything=everything)
    if store is not None:
        store.close()
    _out({"deleted": deleted, "path": path, "all": everything},
         f"purged {deleted} row(s) from {path}", as_json)
