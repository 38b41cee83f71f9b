"""The inference error tree; backends map their transport errors here, in one place each."""

from __future__ import annotations


class InferenceError(Exception):
    """Base of every error an inference backend raises."""

    kind = "inference_error"


class BackendUnavailable(InferenceError):
    """The server is down, timed out, or the stream broke mid-answer."""

    kind = "unavailable"


class RateLimited(InferenceError):
    """The server asked us to slow down."""

    kind = "rate_limited"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ContextTooLong(InferenceError):
    """The prompt does not fit the model's context window."""

    kind = "context_too_long"


class AdapterNotFound(InferenceError):
    """The requested LoRA adapter is not loaded (or does not exist)."""

    kind = "adapter_not_found"


class AdapterRejected(InferenceError):
    """An adapter cannot be loaded: bad files, or a rank above the server's limit."""

    kind = "adapter_rejected"
