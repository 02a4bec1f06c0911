"""Open the prompt store a configuration names (SQLite by default, Redis for deployments)."""

from __future__ import annotations

import os

from gateway.config import AppConfig, ConfigError
from prompt_registry import PromptStore

__all__ = ["open_store"]


def open_store(cfg: AppConfig) -> PromptStore:
    reg = cfg.registry
    if reg.store == "sqlite":
        from prompt_registry.sqlite_store import SqlitePromptStore

        return SqlitePromptStore(cfg.registry_path())
    url = reg.redis_url or os.environ.get(reg.redis_url_env)
    if not url:
        raise ConfigError(f"registry.store is redis but neither registry.redis_url nor the "
                          f"{reg.redis_url_env} environment variable is set")
    from prompt_registry.redis_store import RedisPromptStore

    return RedisPromptStore(url, prefix=reg.redis_key_prefix)
