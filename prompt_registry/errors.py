"""Exception tree of the prompt registry. Callers map these to HTTP codes or CLI errors."""

from __future__ import annotations

__all__ = [
    "ApprovalClosed",
    "ApprovalConflict",
    "GatePolicyConflict",
    "GatePolicyInvalid",
    "LifecycleConflict",
    "LabelConflict",
    "PromptFileError",
    "PromptNotFound",
    "RegistryError",
    "RenderError",
    "SelfApproval",
    "StoreUnavailable",
    "TemplateRejected",
    "UnservedModel",
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


class UnservedModel(PromptFileError, ValueError):
    """A prompt version names a `model:` the configured serving layer does not serve (at
    publish time, or when a version is about to take traffic). The message names the model and
    the served ones. A kind of PromptFileError: the version fails validation against the
    deployment."""

    def __init__(self, model: str, served: list[str], *, prompt: str = "",
                 version: int | None = None) -> None:
        what = f"{prompt} v{version}" if prompt and version is not None else (prompt or "the prompt")
        listed = ", ".join(served) if served else "none"
        super().__init__(f"{what} names model {model!r}, which the serving layer does not serve "
                         f"(served: {listed})")
        self.model = model
        self.served = list(served)


class GatePolicyInvalid(PromptFileError, ValueError):
    """A gate policy does not fit its prompt (e.g. a criterion names a category the prompt's
    verdict schema does not have); the message names the field."""


class GatePolicyConflict(LabelConflict):
    """A compare-and-set write of a prompt's gate policy lost against a concurrent write."""


class LifecycleConflict(LabelConflict):
    """A compare-and-set write of a prompt's version states lost against a concurrent write."""


class ApprovalConflict(LabelConflict):
    """A compare-and-set write of a prompt's four-eyes record (setting and approval requests)
    lost against a concurrent write."""


class ApprovalClosed(LabelConflict):
    """An approval request is no longer pending (approved, denied, failed, or expired)."""


class SelfApproval(RegistryError):
    """A key holder tried to approve their own four-eyes request (callers answer 403)."""
