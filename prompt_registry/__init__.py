"""Prompt registry: immutable prompt versions, labels, audit, and sandboxed rendering.

Knows nothing of HTTP, Ray or vLLM.
"""

from prompt_registry.errors import (
    ApprovalClosed,
    ApprovalConflict,
    GatePolicyConflict,
    GatePolicyInvalid,
    LabelConflict,
    LifecycleConflict,
    PromptFileError,
    PromptNotFound,
    RegistryError,
    RenderError,
    SelfApproval,
    StoreUnavailable,
    TemplateRejected,
    UnservedModel,
)
from prompt_registry.gates import (
    ApprovalRequest,
    ApprovalRequired,
    FourEyesRecord,
    GateOverride,
    GatePolicy,
    GateRefused,
    GateReport,
    PolicyInForce,
    ScorecardRecord,
)
from prompt_registry.lifecycle import LifecycleRecord, VersionBlocked, VersionRetired, VersionState
from prompt_registry.models import (
    FAIL_CLOSED_DECISION,
    EvaluationSpec,
    GateCriterion,
    Message,
    PolicyMeta,
    PromptSpec,
    PromptVersion,
    SamplingParams,
    VerdictSchema,
)
from prompt_registry.ops import check_model_served
from prompt_registry.render import render_messages
from prompt_registry.rollout_stats import RolloutStats, build_rollout_stats
from prompt_registry.store import (
    AuditEntry,
    FourEyesReader,
    FourEyesStore,
    GatedWriter,
    GatePolicyReader,
    GatePolicyStore,
    GateReader,
    KeyReader,
    KeyStore,
    LifecycleReader,
    LifecycleStore,
    MemoStore,
    PromptReader,
    PromptStore,
    PromptWriter,
    PublishResult,
    RolloutReader,
    RolloutStore,
    ScorecardReader,
    ScorecardStore,
)

__all__ = [
    "ApprovalClosed", "ApprovalConflict", "ApprovalRequest", "ApprovalRequired", "FourEyesReader",
    "FourEyesRecord", "FourEyesStore", "SelfApproval",
    "FAIL_CLOSED_DECISION", "AuditEntry", "EvaluationSpec", "GateCriterion", "GateOverride",
    "GatePolicy", "GatePolicyConflict", "GatePolicyInvalid", "GatePolicyReader", "GatePolicyStore",
    "GateReader", "GateRefused", "GateReport", "GatedWriter", "PolicyInForce", "UnservedModel",
    "check_model_served",
    "KeyReader", "KeyStore", "LabelConflict", "MemoStore", "Message",
    "PolicyMeta", "PromptFileError", "PromptNotFound", "PromptReader", "PromptSpec", "PromptStore",
    "PromptVersion", "PromptWriter", "PublishResult", "RegistryError", "RenderError",
    "RolloutReader", "RolloutStats", "RolloutStore", "SamplingParams", "ScorecardReader",
    "ScorecardRecord", "ScorecardStore", "StoreUnavailable", "TemplateRejected", "VerdictSchema",
    "build_rollout_stats", "render_messages",
    "LifecycleConflict", "LifecycleReader", "LifecycleRecord", "LifecycleStore", "VersionBlocked",
    "VersionRetired", "VersionState",
]
