"""The prompt-ops console at `/console`, and `/docs` served without internet access.

One more client of the same service: every console action authenticates through the gateway's
`Authenticator` and calls the functions the admin and feedback routes call, with the same
scopes. See `routes` (pages and JSON endpoints), `sessions` (the server-side session store)
and `docs` (offline Swagger UI).
"""

from gateway.api.console.docs import mount_offline_docs

__all__ = ["mount_offline_docs"]
