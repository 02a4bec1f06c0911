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
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from prompt_registry.errors import PromptNotFound

if TYPE_CHECKING:
    from prompt_registry.store import KeyStore

__all__ = ["KEY_NAME", "SCOPES", "ApiKeyRecord", "UnknownKey", "create_key", "generate_key", "lacks_scope",
           "parse_key", "revoke_key", "verify_secret"]

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


KEY_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class UnknownKey(PromptNotFound):
    """No API key with that id (a registry object that does not exist: 404 on the API)."""


class ApiKeyRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str = Field(..., pattern=r"^[a-f0-9]{12}$")
    name: str = Field(..., pattern=KEY_NAME)
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


def lacks_scope(key_name: str, scope: str, purpose: str = "") -> str:
    """The one wording of a scope refusal: the API's 403 and the command line's refusal alike
    (a remote `modgate` command prints the gateway's message, so it reads as a local refusal).
    *purpose* says what the scope was needed for, e.g. "for changing a gate policy"."""
    alternative = "" if scope == "admin" else " (or 'admin')"
    return (f"API key {key_name!r} lacks the {scope!r}{alternative} scope"
            + (f" needed {purpose}" if purpose else ""))


def create_key(store: KeyStore, name: str, scopes: list[str], *, created_by: str) -> tuple[str, ApiKeyRecord]:
    """Make and store a key: `modgate keys create` and `POST /v1/keys` both come here. Returns
    the key (to show once) and its record (the secret's hash only)."""
    key, record = generate_key(name, scopes, created_by=created_by)
    store.put_key(record)
    return key, record


def revoke_key(store: KeyStore, key_id: str) -> ApiKeyRecord:
    """Mark a key revoked (gateways stop accepting it within their key cache time); the record
    as it was. `modgate keys revoke` and `POST /v1/keys/{key_id}/revoke` both come here."""
    record = store.get_key(key_id)
    if record is None:
        raise UnknownKey(f"no API key with id {key_id!r}")
    store.put_key(record.model_copy(update={"revoked": True}))
    return record
