"""API keys: generated once, shown once, stored hashed, compared in constant time.

A key looks like `mgk_<id>_<secret>`. The store keeps `id -> record` where the record holds the
SHA-256 of the secret (never the secret), the scopes and who made it. Verifying a key is one
lookup by id and a constant-time comparison of hashes. Secrets are 32 random bytes, so a plain
SHA-256 (no slow KDF) is the right hash: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SCOPES", "ApiKeyRecord", "generate_key", "parse_key", "verify_secret"]

# `moderate:pin`: be served a version or label other than one's traffic assignment (testing a
# candidate on live input); without it a caller gets what the rollout assigns, nothing else.
# `gates:write`: change a prompt's promotion gate policy (protected and audited; `admin` may too).
# `samples:read`: read listing content from the sample store (review queue, flips);
# `samples:delete`: delete an item's content from it (`gateway.samples`).
Scope = Literal["moderate", "moderate:pin", "feedback", "prompts:read", "prompts:publish",
                "labels:write", "labels:protected", "gates:write", "samples:read", "samples:delete",
                "admin"]
SCOPES: tuple[str, ...] = ("moderate", "moderate:pin", "feedback", "prompts:read", "prompts:publish",
                           "labels:write", "labels:protected", "gates:write", "samples:read",
                           "samples:delete", "admin")


class ApiKeyRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str = Field(..., pattern=r"^[a-f0-9]{12}$")
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    scopes: list[Scope] = Field(..., min_length=1)
    secret_sha256: str = Field(..., pattern=r"^[a-f0-9]{64}$")
    created_at: datetime
    created_by: str
    revoked: bool = False

    def allows(self, scope: str) -> bool:
        return not self.revoked and ("admin" in self.scopes or scope in self.scopes)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def generate_key(name: str, scopes: list[str], *, created_by: str) -> tuple[str, ApiKeyRecord]:
    """Return (the key to hand out once, the record to store)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    record = ApiKeyRecord(key_id=key_id, name=name, scopes=scopes,  # type: ignore[arg-type]
                          secret_sha256=_digest(secret), created_at=datetime.now(UTC),
                          created_by=created_by)
    return f"mgk_{key_id}_{secret}", record


def parse_key(key: str) -> tuple[str, str] | None:
    """Split a presented key into (id, secret); None when it is not of our shape."""
    prefix, _, rest = key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != "mgk" or len(key_id) != 12 or not secret:
        return None
    return key_id, secret


def verify_secret(record: ApiKeyRecord, secret: str) -> bool:
    return hmac.compare_digest(record.secret_sha256, _digest(secret))
