"""Serving: reach open-weight models run by vLLM inside Ray Serve (or any OpenAI-compatible
server). Knows nothing about prompts. Heavy imports (ray, vllm, torch) live only in
`serving.ray_app` and `serving.tiny_model`, imported lazily.
"""

from serving.errors import (
    BackendBadRequest,
    BackendError,
    BackendModelNotFound,
    BackendOverloaded,
    BackendProtocolError,
    BackendRejectedInput,
    BackendTimeout,
    BackendUnavailable,
)
from serving.protocol import ChatChunk, ChatRequest, ChatResult, InferenceBackend, Timings

__all__ = [
    "BackendBadRequest", "BackendError", "BackendModelNotFound", "BackendOverloaded", "BackendProtocolError",
    "BackendRejectedInput", "BackendTimeout", "BackendUnavailable", "ChatChunk", "ChatRequest", "ChatResult",
    "InferenceBackend", "Timings",
]
