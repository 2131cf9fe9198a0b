"""One error tree. Each class knows its HTTP status and OpenAI error type; the API edge renders it once."""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    retry_after: int | None = None
    """Seconds a client should wait before retrying (sent as Retry-After)."""

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after


class SettingsError(ApplianceError):
    """A setting, config file or environment variable is invalid."""

    code = "invalid_settings"


class InvalidRequest(ApplianceError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class UnsupportedForModel(InvalidRequest):
    """The model exists but cannot serve this kind of request (chat on an embedding model...)."""

    code = "model_not_supported"


class ModelNotFound(ApplianceError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RequestNotFound(ApplianceError):
    """No usage record of the caller's tenant has this request id (feedback on an unknown or foreign request)."""

    status = 404
    type = "invalid_request_error"
    code = "request_not_found"


class PayloadTooLarge(ApplianceError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class ModelUnavailable(ApplianceError):
    """The model is still loading, or failed to load."""

    status = 503
    type = "server_error"
    code = "model_unavailable"


class PeerUnavailable(ModelUnavailable):
    """A model split over RPC workers cannot run: a worker is unreachable, died, or runs another llama.cpp build."""

    code = "peer_unavailable"


class ServerOverloaded(ApplianceError):
    """The waiting queue is full: back off and retry."""

    status = 503
    type = "server_error"
    code = "server_overloaded"
    retry_after = 1


class QueueTimeout(ServerOverloaded):
    """The request waited longer than the queue timeout for a free slot."""

    code = "queue_timeout"


class RequestTimeout(ApplianceError):
    status = 504
    type = "server_error"
    code = "request_timeout"


class EngineError(ApplianceError):
    """Inference failed inside a native engine. The message is safe to show; details go to the log."""

    status = 500
    type = "server_error"
    code = "engine_error"


class ModelStoreError(ApplianceError):
    """Import, verify or remove of a model failed; nothing was left half-registered."""

    status = 400
    type = "invalid_request_error"
    code = "model_store_error"


class ChecksumMismatch(ModelStoreError):
    code = "checksum_mismatch"


class CollectionNotFound(ApplianceError):
    status = 404
    type = "invalid_request_error"
    code = "collection_not_found"


class CollectionExists(ApplianceError):
    status = 409
    type = "invalid_request_error"
    code = "collection_exists"


class DocumentNotFound(ApplianceError):
    status = 404
    type = "invalid_request_error"
    code = "document_not_found"


class AuthenticationFailed(ApplianceError):
    """No key, an unknown key, a revoked or expired key, or a bad cluster signature."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(ApplianceError):
    """The key is valid but its role or tenant may not do this (or use this model)."""

    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class RateLimited(ApplianceError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    retry_after = 1


class BudgetExceeded(RateLimited):
    """The tenant's daily or monthly token budget cannot cover this request (prompt + max_tokens)."""

    code = "budget_exceeded"


class TenantNotFound(ApplianceError):
    status = 404
    type = "invalid_request_error"
    code = "tenant_not_found"


class TenantExists(ApplianceError):
    status = 409
    type = "invalid_request_error"
    code = "tenant_exists"


class KeyNotFound(ApplianceError):
    status = 404
    type = "invalid_request_error"
    code = "key_not_found"


class DataDirError(ApplianceError):
    """The data directory cannot be used by this process or release (owner, format, not empty...)."""

    code = "data_dir_error"


class BackupError(ApplianceError):
    """A backup could not be written, or an archive cannot be restored (the data is left untouched)."""

    code = "backup_error"


class RouteUnavailable(ModelUnavailable):
    """Every candidate of a routed model id (settings [routing.<name>]) was loading, failed, full or timed
    out before its first token, and no cached answer to the same request was found."""

    code = "route_unavailable"
    retry_after = 2
