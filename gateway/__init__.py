"""Gateway: the internal moderation API. The only package that knows prompts and serving."""

from gateway.api.app import create_app

__all__ = ["create_app"]
