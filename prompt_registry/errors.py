"""Exception tree of the prompt registry. Callers map these to HTTP codes or CLI errors."""

from __future__ import annotations

__all__ = [
    "LabelConflict",
    "PromptFileError",
    "PromptNotFound",
    "RegistryError",
    "RenderError",
    "StoreUnavailable",
    "TemplateRejected",
]


class RegistryError(Exception):
    """Base of every error the registry raises on purpose."""


class TemplateRejected(RegistryError, ValueError):
    """A template uses something the sandbox does not allow (at publish time)."""


class RenderError(RegistryError):
    """A request did not provide what the prompt version needs (at render time)."""


class PromptNotFound(RegistryError, LookupError):
    """No such prompt, label or version."""


class LabelConflict(RegistryError):
    """A compare-and-set label move lost against a concurrent move."""


class PromptFileError(RegistryError):
    """A prompt file could not be read or validated; the message names file and field."""


class StoreUnavailable(RegistryError):
    """The backing store cannot be reached."""
