"""The Consul API client: python-consul2's API surface over one pool of connections.

python-consul2 builds each call (path, parameters, JSON body, `X-Consul-Token`)
and parses each answer; its own asyncio client opens a new aiohttp session per
request and never closes it, so the HTTP goes through `_SessionTransport` instead:
one `http_client.Pool` for the sidecar's life (kept-alive connections; no aiohttp,
about 8 MB of resident memory less), every call bounded by its own timeout
(a blocking query by its `wait` plus Consul's jitter and a margin). Errors come
out as the sidecar's `ConsulError` tree with Consul's status and plain-text
message; the token is sent in a header only and never appears in one.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import re
import ssl
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from sidecar.config import ConsulConfig
from sidecar.discovery.health import os_reason
from sidecar.discovery.http_client import HTTPClientError, Pool
from sidecar.errors import ConsulError, ConsulUnreachable, consul_http_error


def _load_consul_base() -> ModuleType:
    """python-consul2's `consul/base.py` (every endpoint, path and parameter), loaded
    without the package's `__init__`, which imports its blocking client and with it
    `requests`: about 6 MB of resident memory the sidecar would never use."""
    loaded = sys.modules.get("consul.base")
    if loaded is not None:  # someone imported the package the usual way: reuse it
        return loaded
    package = importlib.util.find_spec("consul")  # locates the package, runs nothing
    if package is None or package.origin is None:
        raise ImportError("python-consul2 is not installed (pip install python-consul2)")
    spec = importlib.util.spec_from_file_location(
        "sidecar._consul_base", Path(package.origin).with_name("base.py")
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_consul: Any = _load_consul_base()
_HTTPClientBase: Any = _consul.HTTPClient
_ConsulBase: Any = _consul.Consul

#: Bound on a call that is not a blocking query.
CALL_TIMEOUT = 10.0
#: Added to a blocking query's `wait` (Consul adds up to wait/16 of jitter itself).
BLOCKING_MARGIN = 5.0

#: The operation the current call is for, read by the transport for its errors.
_OPERATION: ContextVar[str] = ContextVar("consul_operation", default="consul")

_WAIT = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


class _Answer:
    """What python-consul2's callbacks read: code, headers, body and content."""

    __slots__ = ("body", "code", "content", "headers")

    def __init__(self, code: int, headers: Mapping[str, str], content: bytes) -> None:
        self.code = code
        self.headers = headers
        self.content = content
        self.body = content.decode("utf-8", "replace")


class _SessionTransport(_HTTPClientBase):  # type: ignore[misc]
    """python-consul2's HTTP seam, served by the client's one connection pool."""

    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None, owner: ConsulClient):
        parts = urlsplit(base_url)
        super().__init__(
            host=parts.hostname, port=parts.port, scheme=parts.scheme, verify=ssl_context
        )
        self.base_uri = base_url  # keeps an IPv6 literal's brackets
        self._ssl = ssl_context
        self._owner = owner

    async def _request(
        self,
        callback: Callable[[_Answer], Any],
        method: str,
        path: str,
        params: Any,
        *,
        data: str | None,
        headers: Mapping[str, str] | None,
    ) -> Any:
        owner = self._owner
        operation = _OPERATION.get()
        timeout = CALL_TIMEOUT
        for key, value in params or ():
            if key == "wait":
                timeout = _wait_seconds(str(value)) * 17 / 16 + BLOCKING_MARGIN
        try:
            async with asyncio.timeout(timeout):
                resp = await owner.session().request(
                    method, self.uri(path, params), (data or "").encode(), headers
                )
            answer = _Answer(resp.status, resp.headers, resp.body)
        except TimeoutError:
            raise ConsulUnreachable(operation, f"no answer within {timeout:g}s") from None
        except HTTPClientError as exc:
            raise ConsulUnreachable(operation, str(exc)) from None
        except OSError as exc:
            raise ConsulUnreachable(operation, os_reason(exc)) from None
        owner.contacted()
        if answer.code >= 400:
            raise consul_http_error(operation, answer.code, answer.body)
        try:
            return callback(answer)
        except (ValueError, KeyError, _consul.ConsulException) as exc:
            raise ConsulError(operation, f"unreadable answer from Consul: {exc}") from None

    async def get(self, callback: Any, path: str, params: Any = None, headers: Any = None) -> Any:
        return await self._request(callback, "GET", path, params, data=None, headers=headers)

    async def put(
        self, callback: Any, path: str, params: Any = None, data: str = "", headers: Any = None
    ) -> Any:
        return await self._request(callback, "PUT", path, params, data=data, headers=headers)

    async def delete(
        self, callback: Any, path: str, params: Any = None, data: str = "", headers: Any = None
    ) -> Any:
        return await self._request(callback, "DELETE", path, params, data=data, headers=headers)

    async def post(
        self, callback: Any, path: str, params: Any = None, data: str = "", headers: Any = None
    ) -> Any:
        return await self._request(callback, "POST", path, params, data=data, headers=headers)


class _Consul(_ConsulBase):  # type: ignore[misc]
    """python-consul2's endpoint groups without its constructor, which reads the
    environment itself; the sidecar's config has already applied CONSUL_* there."""

    def __init__(self, http: _SessionTransport, token: str | None, dc: str | None) -> None:
        self.http = http
        self.token = token
        self.dc = dc
        self.scheme = http.scheme
        self.consistency = "default"
        self.agent = _consul.Consul.Agent(self)
        self.catalog = _consul.Consul.Catalog(self)
        self.health = _consul.Consul.Health(self)
        self.status = _consul.Consul.Status(self)


class ConsulClient:
    """The sidecar's Consul calls. Each names its operation for errors and metrics."""

    def __init__(
        self,
        config: ConsulConfig,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.address = config.address
        self.datacenter = config.datacenter
        self._ssl = _ssl_context(config) if config.address.startswith("https://") else None
        self._session: Pool | None = None
        self._api = _Consul(_SessionTransport(config.address, self._ssl, self), config.token, None)
        self._on_error = on_error
        self.last_contact: float | None = None  # wall-clock time of the last answer

    def session(self) -> Pool:
        """The connection pool every call goes through (a new one after `close`)."""
        if self._session is None or self._session.closed:
            self._session = Pool(self.address, self._ssl, name="Consul", idle_timeout=60)
        return self._session

    def contacted(self) -> None:
        self.last_contact = time.time()

    def last_contact_iso(self) -> str | None:
        if self.last_contact is None:
            return None
        return datetime.fromtimestamp(self.last_contact, UTC).isoformat(timespec="milliseconds")

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def _call(self, operation: str, call: Callable[[], Any]) -> Any:
        token = _OPERATION.set(operation)
        try:
            return await call()
        except ConsulError:
            if self._on_error is not None:
                self._on_error(operation.split(":", 1)[0])
            raise
        finally:
            _OPERATION.reset(token)

    # --- agent mode ---------------------------------------------------------------------

    async def agent_register(self, service: Mapping[str, Any], check: Mapping[str, Any]) -> None:
        api = self._api.agent.service
        await self._call(
            "register",
            lambda: api.register(
                service["Name"],
                service_id=service["ID"],
                address=service["Address"],
                port=service["Port"],
                tags=list(service["Tags"]),
                meta=dict(service["Meta"]),
                check=dict(check),
            ),
        )

    async def agent_check(self, check_id: str, status: str, note: str) -> None:
        """Report a TTL check: passing/warning/critical with a note (resets the TTL)."""
        check = self._api.agent.check
        call = {"passing": check.ttl_pass, "warning": check.ttl_warn, "critical": check.ttl_fail}
        await self._call("check_update", lambda: call[status](check_id, notes=note or None))

    async def agent_deregister(self, service_id: str) -> None:
        api = self._api.agent.service
        await self._call("deregister", lambda: api.deregister(service_id))

    # --- catalog mode -------------------------------------------------------------------

    async def catalog_register(
        self,
        node: str,
        address: str,
        service: Mapping[str, Any],
        check: Mapping[str, Any],
        operation: str = "register",
    ) -> None:
        api = self._api.catalog
        await self._call(
            operation,
            lambda: api.register(
                node,
                address,
                service=dict(service),
                check=dict(check),
                dc=self.datacenter,
                node_meta={"external-source": "hms-sidecar"},
            ),
        )

    async def catalog_deregister(self, node: str, service_id: str | None = None) -> None:
        """Remove a node and everything on it, or only one service instance on it."""
        api = self._api.catalog
        await self._call(
            "deregister",
            lambda: api.deregister(node, service_id=service_id, dc=self.datacenter),
        )

    # --- discovery ----------------------------------------------------------------------

    async def health_service(
        self,
        service: str,
        *,
        index: int,
        wait: float,
        tags: Sequence[str] = (),
        passing: bool = True,
    ) -> tuple[int, list[dict[str, Any]]]:
        """A blocking query on /v1/health/service/<service>; (X-Consul-Index, entries).

        With several tags Consul's own `?tag=` takes the first and the rest are
        filtered here (python-consul2 sends one); an instance must carry all of them.
        """
        api = self._api.health
        raw_index, entries = await self._call(
            f"watch:{service}",
            lambda: api.service(
                service,
                index=str(index) if index else None,
                wait=f"{math.ceil(wait * 1000)}ms",
                passing=passing,
                tag=tags[0] if tags else None,
                dc=self.datacenter,
            ),
        )
        try:
            new_index = int(raw_index)
        except (TypeError, ValueError):
            raise ConsulError(
                f"watch:{service}", f"bad X-Consul-Index {raw_index!r} from Consul"
            ) from None
        if not isinstance(entries, list):
            raise ConsulError(f"watch:{service}", "expected a JSON array from Consul")
        if len(tags) > 1:
            wanted = set(tags)
            entries = [
                e for e in entries if wanted <= set((e.get("Service") or {}).get("Tags") or ())
            ]
        return new_index, entries

    async def service_known(self, service: str) -> bool:
        """Whether Consul's catalog has any instance of `service`, healthy or not."""
        api = self._api.catalog
        _, entries = await self._call(
            f"lookup:{service}", lambda: api.service(service, dc=self.datacenter)
        )
        return bool(entries)

    def __repr__(self) -> str:
        return f"<ConsulClient {self.address} last_contact={self.last_contact}>"


def _wait_seconds(text: str) -> float:
    match = _WAIT.fullmatch(text)
    return float(match[1]) * _UNITS[match[2]] if match else 300.0


def _ssl_context(config: ConsulConfig) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=config.ca_file)
