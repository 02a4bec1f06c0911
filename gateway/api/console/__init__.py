"""The prompt-ops console at `/console`, and `/docs` served without internet access.

One more client of the same service: every console action authenticates through the gateway's
`Authenticator` and calls the functions the admin and feedback routes call, with the same
scopes. See `routes` (pages and JSON endpoints), `sessions` (the server-side session store)
and `docs` (offline Swagger UI).
"""

from gateway.api.console.docs import mount_offline_docs
from gateway.api.console.routes import CONSOLE_WRITES, build_console_router
from gateway.api.console.sessions import SessionStore

__all__ = ["CONSOLE_WRITES", "SessionStore", "build_console_router", "mount_offline_docs"]
