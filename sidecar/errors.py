"""The sidecar's exception tree and the app-facing error contract (SPEC §4).

Foreign exceptions (OSError, TimeoutError, parser errors) are mapped to these at
the edge where they happen; nothing above that edge sees them.
"""

from __future__ import annotations

import json
from enum import StrEnum

_STATUS: dict[str, int] = {
    "NO_ROUTE": 404,
    "NO_HEALTHY_ENDPOINTS": 503,
    "CIRCUIT_OPEN": 503,
    "OVERLOADED": 503,
    "UPSTREAM_CONNECT_FAILED": 502,
    "UPSTREAM_TIMEOUT": 504,
    "REQUEST_TIMEOUT": 408,
    "BODY_TOO_LARGE": 413,
    "BAD_REQUEST": 400,
    "NOT_IMPLEMENTED": 501,
    "SPOOL_FULL": 507,
    "EVENTS_UNAVAILABLE": 503,
}


class ErrorCode(StrEnum):
    """Every error the sidecar itself answers with; `status` is its HTTP status."""

    NO_ROUTE = "NO_ROUTE"
    NO_HEALTHY_ENDPOINTS = "NO_HEALTHY_ENDPOINTS"
    CIRCUIT_OPEN = "CIRCUIT_OPEN"
    OVERLOADED = "OVERLOADED"
    UPSTREAM_CONNECT_FAILED = "UPSTREAM_CONNECT_FAILED"
    UPSTREAM_TIMEOUT = "UPSTREAM_TIMEOUT"
    REQUEST_TIMEOUT = "REQUEST_TIMEOUT"  # the app stopped sending its request body
    BODY_TOO_LARGE = "BODY_TOO_LARGE"
    BAD_REQUEST = "BAD_REQUEST"
    NOT_IMPLEMENTED = "NOT_IMPLEMENTED"  # a well-formed request with a method the proxy can't parse
    SPOOL_FULL = "SPOOL_FULL"
    EVENTS_UNAVAILABLE = "EVENTS_UNAVAILABLE"  # neither the broker nor the spool took it

    @property
    def status(self) -> int:
        return _STATUS[self.value]


class SidecarError(Exception):
    """Base of every exception the sidecar raises on purpose."""


class ConfigError(SidecarError):
    """The configuration is invalid; `problems` lists every one as 'path: reason'."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ProxyError(SidecarError):
    """A request the sidecar answers itself with the JSON error contract."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        upstream: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.upstream = upstream
        self.headers = headers

    def body(self) -> bytes:
        """The JSON body of SPEC §4: {"error": {"code", "message", "upstream"}}."""
        return json.dumps(
            {"error": {"code": self.code.value, "message": self.message, "upstream": self.upstream}}
        ).encode()

    def __repr__(self) -> str:
        return f"ProxyError({self.code.value}, {self.message!r}, upstream={self.upstream!r})"


class ConsulError(SidecarError):
    """A Consul call failed; `operation` names the call (register, watch:billing, ...)."""

    def __init__(self, operation: str, message: str) -> None:
        super().__init__(f"{operation}: {message}")
        self.operation = operation
        self.message = message


class ConsulUnreachable(ConsulError):
    """No answer from Consul: connection refused, reset, TLS failure or the call's timeout."""


class ConsulHTTPError(ConsulError):
    """Consul answered with an error status; `status` and Consul's plain-text `reason`."""

    def __init__(self, operation: str, status: int, reason: str) -> None:
        reason = reason.strip() or "(empty body)"
        super().__init__(operation, f"Consul answered {status}: {reason}")
        self.status = status
        self.reason = reason


class ConsulBadRequest(ConsulHTTPError):
    """400: Consul rejected what was sent (a validation error names the field)."""


class ConsulPermissionDenied(ConsulHTTPError):
    """403: the ACL token is unknown or lacks a permission."""


class ConsulNotFound(ConsulHTTPError):
    """404: an unknown check or service (the agent lost its state) or endpoint."""


def consul_http_error(operation: str, status: int, reason: str) -> ConsulHTTPError:
    """The most specific `ConsulHTTPError` for a status."""
    kind = {400: ConsulBadRequest, 403: ConsulPermissionDenied, 404: ConsulNotFound}.get(
        status, ConsulHTTPError
    )
    return kind(operation, status, reason)
