"""A Consul HTTP API double, as strict as `../shared/reference/consul-http-api.md` says
real Consul is: plain-text errors with Consul's wording, 405 with `Allow`, 404 for an
unknown check or service, 400 for unknown JSON fields, case-insensitive keys with
snake_case aliases, Go durations, TTL expiry to critical, reaping after
`DeregisterCriticalServiceAfter`, ACL tokens (403), and blocking queries on the
health and catalog reads with `X-Consul-Index`.

One agent (node `node`, 127.0.0.1) whose services are in the catalog at once, plus
catalog-only nodes (`/v1/catalog/register`, `register_instance`). Test controls:
outages that refuse connections (`go_down`/`come_up`, state kept), an agent that
loses its state, an index that goes backwards or is 0, slow answers, forced error
answers, spurious wake-ups and health flaps. `clock.advance()` jumps time forward
for minute-long TTLs and reaping; short TTLs run in real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Json = dict[str, Any]

#: Consul's floor for DeregisterCriticalServiceAfter (agent.config CheckDeregisterIntervalMin).
DEREGISTER_MIN = 60.0
#: How often the double expires TTLs and reaps, in real time (real Consul's reaper: 30 s).
TICK = 0.05

#: One element of a Go duration: digits, an optional fraction, then the unit (time.ParseDuration).
_GO_ELEMENT = re.compile(r"([0-9]*)(\.[0-9]*)?([^0-9.]*)")
_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_META_KEY = re.compile(r"[a-zA-Z0-9_-]+")  # fullmatch: Go's `$` never matches before "\n"
_STATUSES = ("passing", "warning", "critical")
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_go_duration(value: object) -> float:
    """Seconds from a Go duration string (as `time.ParseDuration` reads it, errors worded
    alike), or from a JSON number of nanoseconds."""
    if isinstance(value, bool):
        raise ValueError("bool")
    if isinstance(value, int | float):
        return float(value) / 1e9
    if not isinstance(value, str):
        raise ValueError(f"time: invalid duration {value!r}")
    invalid = f'time: invalid duration "{value}"'
    text, sign = value, 1.0
    if text[:1] in ("-", "+"):
        sign, text = (-1.0 if text[0] == "-" else 1.0), text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(invalid)
    total = 0.0
    while text:
        match = _GO_ELEMENT.match(text)
        assert match is not None  # every part of the pattern may be empty
        whole, fraction, unit = match.groups()
        if not whole and len(fraction or "") < 2:
            raise ValueError(invalid)
        if not unit:
            raise ValueError(f'time: missing unit in duration "{value}"')
        if unit not in _GO_UNITS:
            raise ValueError(f'time: unknown unit "{unit}" in duration "{value}"')
        total += float((whole or "0") + (fraction or "")) * _GO_UNITS[unit]
        text = text[match.end() :]
    return sign * total


class ConsulFailure(Exception):
    """An answer with a plain-text error body, the way Consul writes them."""

    def __init__(self, status: int, text: str, headers: Mapping[str, str] | None = None):
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = dict(headers or {})


# --- JSON decoding like Consul's (lib/decode + DisallowUnknownFields) ----------------------

_SERVICE_FIELDS = [
    "ID",
    "Name",
    "Tags",
    "Address",
    "TaggedAddresses",
    "Meta",
    "Port",
    "Kind",
    "Proxy",
    "Connect",
    "Check",
    "Checks",
    "EnableTagOverride",
    "Weights",
    "Namespace",
    "Partition",
    "SocketPath",
    "Locality",
]
_CHECK_FIELDS = [
    "CheckID",
    "ID",
    "Name",
    "Notes",
    "Status",
    "ServiceID",
    "ScriptArgs",
    "Args",
    "HTTP",
    "Header",
    "Method",
    "Body",
    "DisableRedirects",
    "TCP",
    "UDP",
    "GRPC",
    "GRPCUseTLS",
    "TLSServerName",
    "TLSSkipVerify",
    "Interval",
    "Timeout",
    "TTL",
    "DeregisterCriticalServiceAfter",
    "OutputMaxSize",
    "FailuresBeforeWarning",
    "FailuresBeforeCritical",
    "SuccessBeforePassing",
    "H2PING",
    "H2PingUseTLS",
    "DockerContainerID",
    "Shell",
    "AliasNode",
    "AliasService",
    "OSService",
    "Output",
    "Node",
    "ServiceName",
    "ServiceTags",
    "Definition",
    "Type",
    "Namespace",
    "Partition",
    "ExposedPort",
]
_CATALOG_FIELDS = [
    "ID",
    "Node",
    "Address",
    "Datacenter",
    "TaggedAddresses",
    "NodeMeta",
    "Service",
    "Check",
    "Checks",
    "SkipNodeUpdate",
    "Namespace",
    "Partition",
    "Locality",
]
_CATALOG_SERVICE_FIELDS = [
    "ID",
    "Service",
    "Tags",
    "Address",
    "TaggedAddresses",
    "Meta",
    "Port",
    "Weights",
    "EnableTagOverride",
    "Kind",
    "Proxy",
    "Connect",
    "Namespace",
    "Partition",
    "SocketPath",
    "Locality",
]
_DEREGISTER_FIELDS = ["Node", "Datacenter", "CheckID", "ServiceID", "Namespace", "Partition"]
_UPDATE_FIELDS = ["Status", "Output"]
_WEIGHT_FIELDS = ["Passing", "Warning"]
_ADDRESS_FIELDS = ["Address", "Port"]


def _fold(name: str) -> str:
    return name.lower().replace("_", "")


def _decode_object(raw: object, fields: Iterable[str]) -> Json:
    """Canonical keys for a JSON object: case-insensitive, snake_case aliases; an unknown
    key is Consul's 400."""
    if not isinstance(raw, dict):
        raise ConsulFailure(400, f"Request decode failed: json: cannot unmarshal {_kind(raw)}")
    canonical = {_fold(f): f for f in fields}
    out: Json = {}
    for key, value in raw.items():
        name = canonical.get(_fold(str(key)))
        if name is None:
            raise ConsulFailure(400, f'Request decode failed: json: unknown field "{key}"')
        out[name] = value
    return out


def _kind(value: object) -> str:
    return {list: "array", str: "string", bool: "bool", type(None): "null"}.get(
        type(value), "number"
    )


async def _body(request: web.Request) -> object:
    raw = await request.read()
    if not raw.strip():
        raise ConsulFailure(400, "Request decode failed: EOF")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ConsulFailure(400, f"Request decode failed: {exc}") from None


# --- ACL --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """What one token may do. `"*"` in a set stands for every name."""

    accessor_id: str = "00000000-0000-0000-0000-00000000abcd"
    service_read: frozenset[str] = frozenset({"*"})
    service_write: frozenset[str] = frozenset()
    node_write: frozenset[str] = frozenset()

    def allows(self, permission: str, name: str) -> bool:
        names = {
            "service:read": self.service_read | self.service_write,
            "service:write": self.service_write,
            "node:write": self.node_write,
        }[permission]
        return "*" in names or name in names


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    at: float


class Clock:
    """Monotonic time plus an offset that `advance` moves forward."""

    def __init__(self, on_advance: Callable[[], None]) -> None:
        self.offset = 0.0
        self._on_advance = on_advance

    def now(self) -> float:
        return time.monotonic() + self.offset

    async def advance(self, seconds: float) -> None:
        """Jump forward; TTL expiry and reaping run at once, before this returns."""
        self.offset += seconds
        self._on_advance()
        await asyncio.sleep(0)


@dataclass
class _Check:
    node: str
    check_id: str
    name: str
    status: str = "critical"
    output: str = ""
    notes: str = ""
    service_id: str = ""
    service_name: str = ""
    ttl: float = 0.0  # 0: not a TTL check
    interval: float = 0.0
    deregister_after: float = 0.0
    expires_at: float = 0.0
    critical_since: float | None = None
    create_index: int = 0
    modify_index: int = 0

    def view(self) -> Json:
        return {
            "Node": self.node,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.status,
            "Notes": self.notes,
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": [],
            "Type": "ttl" if self.ttl else "",
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class _Node:
    name: str
    address: str
    meta: dict[str, str] = field(default_factory=dict)
    services: dict[str, Json] = field(default_factory=dict)
    checks: dict[str, _Check] = field(default_factory=dict)
    create_index: int = 0
    modify_index: int = 0


def _tagged(address: str, port: int) -> Json:
    try:
        version = ipaddress.ip_address(address).version
    except ValueError:
        return {}
    suffix = "ipv4" if version == 4 else "ipv6"
    return {
        f"lan_{suffix}": {"Address": address, "Port": port},
        f"wan_{suffix}": {"Address": address, "Port": port},
    }


def _validate_meta(meta: object, what: str = "Service") -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ConsulFailure(400, "Request decode failed: json: cannot unmarshal Meta")
    if len(meta) > 64:
        raise ConsulFailure(
            400, f"Invalid {what} Meta: {what} metadata cannot contain more than 64 key/value pairs"
        )
    for key, value in meta.items():
        prefix = f"Invalid {what} Meta: Couldn't load metadata pair ('{key}', '{value}'): "
        if not key:
            raise ConsulFailure(400, prefix + "Key cannot be blank")
        if not _META_KEY.fullmatch(key):
            raise ConsulFailure(400, prefix + "Key contains invalid characters")
        if len(key) > 128:
            raise ConsulFailure(400, prefix + "Key is too long (limit: 128 characters)")
        if key.startswith("consul-"):
            raise ConsulFailure(400, prefix + "Key prefix 'consul-' is reserved for internal use")
        if not isinstance(value, str):
            raise ConsulFailure(400, "Request decode failed: json: cannot unmarshal Meta value")
        if len(value.encode()) > 512:  # Go's len(): bytes, not characters
            raise ConsulFailure(400, prefix + "Value is too long (limit: 512 characters)")
    return dict(meta)


def _parse_bool_flag(request: web.Request, name: str, message: str) -> bool | None:
    if name not in request.query:
        return None
    value = request.query[name]
    if value == "" or value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConsulFailure(400, message)


_Route = Callable[..., Awaitable[web.Response]]


class ConsulDouble:
    """The double; see the module docstring. Start with `await ConsulDouble().start()`."""

    def __init__(
        self,
        *,
        acl_tokens: Mapping[str, Policy] | None = None,
        default_policy: str = "allow",
        node: str = "node1",
        datacenter: str = "dc1",
    ) -> None:
        self.acl_tokens = dict(acl_tokens) if acl_tokens is not None else None
        self.default_policy = default_policy
        self.node = node
        self.datacenter = datacenter
        self.requests: list[RecordedRequest] = []
        self.index = 10
        self.slow = 0.0
        self.fail_with: tuple[int, str] | None = None
        self.clock = Clock(self._tick)
        self.port = 0
        self._service_index: dict[str, int] = {}
        self._catalog_index = self.index
        self._index_zero = False
        self._epoch = 0  # bumped when the index goes backwards: every blocked query returns
        self._changed = asyncio.Event()
        self._nodes: dict[str, _Node] = {}
        self._agent = _Node(node, "127.0.0.1", create_index=self.index, modify_index=self.index)
        self._agent.checks["serfHealth"] = _Check(
            node, "serfHealth", "Serf Health Status", "passing", "Agent alive and reachable"
        )
        self._nodes[node] = self._agent
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._active: dict[int, web.Request] = {}
        self._routes: list[tuple[re.Pattern[str], tuple[str, ...], _Route]] = []
        self._add_routes()

    # --- life ------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> ConsulDouble:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self.port = port
        await self.come_up()
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())
        return self

    async def come_up(self) -> None:
        """Listen (again) on the same port; all state is as it was."""
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        server = self._site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def go_down(self) -> None:
        """Refuse connections: stop listening and cut every open request (state is kept)."""
        site, self._site = self._site, None
        if site is not None and site._server is not None:
            site._server.close()  # no new connections; stop() would wait for the open ones
        for request in list(self._active.values()):
            if request.transport is not None:
                request.transport.abort()
        self._epoch += 1  # blocked queries return now (to a cut connection) instead of at `wait`
        self._wake()
        if site is not None:
            await site.stop()

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self.go_down()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- test controls ---------------------------------------------------------------------------

    def restart_agent(self) -> None:
        """The agent restarted without its state: its services and checks are gone."""
        names = {s["Service"] for s in self._agent.services.values()}
        self._agent.services.clear()
        for check_id in [c for c in self._agent.checks if c != "serfHealth"]:
            del self._agent.checks[check_id]
        self._write(names)

    def set_index_backwards(self, to: int = 1) -> None:
        """A snapshot restore: the index drops to `to`; blocked queries return at once."""
        self.index = max(to, 1)
        self._service_index = {k: min(v, self.index) for k, v in self._service_index.items()}
        self._catalog_index = min(self._catalog_index, self.index)
        self._epoch += 1
        self._wake()

    def set_index_zero(self, on: bool = True) -> None:
        """A buggy server: every answer says X-Consul-Index: 0."""
        self._index_zero = on
        self._epoch += 1
        self._wake()

    def spurious_wakeup(self, service: str) -> None:
        """Wake blocked queries on `service` with a higher index and the same body."""
        self._write({service})

    def register_instance(
        self,
        service: str,
        *,
        id: str,
        address: str,
        port: int,
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        node: str | None = None,
        status: str = "passing",
        output: str = "",
        check_id: str | None = None,
    ) -> None:
        """Another instance somewhere: a catalog node with the service and one check."""
        name = node or f"node-{id}"
        entry = self._nodes.get(name)
        self.index += 1
        if entry is None:
            entry = self._nodes[name] = _Node(name, address, create_index=self.index)
        entry.services[id] = self._service_record(
            {
                "ID": id,
                "Service": service,
                "Tags": list(tags),
                "Meta": dict(meta or {}),
                "Address": address,
                "Port": port,
            }
        )
        cid = check_id or f"service:{id}"
        entry.checks[cid] = _Check(
            name,
            cid,
            f"Service '{service}' check",
            status,
            output,
            "",
            id,
            service,
            create_index=self.index,
        )
        self._write({service})

    def set_instance_status(self, service_id: str, status: str, output: str = "") -> None:
        """Flap the health of an instance (agent or catalog): every check of it."""
        for entry in self._nodes.values():
            if service_id in entry.services:
                for check in entry.checks.values():
                    if check.service_id == service_id:
                        self._set_status(check, status, output)
                self._write({entry.services[service_id]["Service"]})
                return
        raise KeyError(service_id)

    def deregister_instance(self, service_id: str) -> None:
        for entry in self._nodes.values():
            if service_id in entry.services:
                self._remove_service(entry, service_id)
                return
        raise KeyError(service_id)

    # --- inspection ------------------------------------------------------------------------------

    def services(self) -> dict[str, Json]:
        """The agent's services by ID, as `/v1/agent/services` shows them."""
        return {sid: self._agent_view(s) for sid, s in self._agent.services.items()}

    def checks(self) -> dict[str, Json]:
        """The agent's checks by ID (with `TTL` seconds and `DeregisterAfter` for tests)."""
        return {
            cid: {**c.view(), "TTL": c.ttl, "DeregisterAfter": c.deregister_after}
            for cid, c in self._agent.checks.items()
            if cid != "serfHealth"
        }

    def catalog_instances(self, service: str) -> list[Json]:
        """/v1/health/service/<service> without filters."""
        return self._health_entries(service)

    def nodes(self) -> dict[str, Json]:
        """Every node: name → {Address, Meta, Services (IDs), Checks (IDs)}."""
        return {
            n.name: {
                "Address": n.address,
                "Meta": dict(n.meta),
                "Services": sorted(n.services),
                "Checks": sorted(n.checks),
            }
            for n in self._nodes.values()
        }

    # --- time ------------------------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self._tick()

    def _tick(self) -> None:
        now = self.clock.now()
        touched: set[str] = set()
        for entry in list(self._nodes.values()):
            for check in list(entry.checks.values()):
                if check.ttl and now >= check.expires_at:
                    # Consul's TTL timer fires once, whatever the status, until the next update.
                    check.expires_at = math.inf
                    self._set_status(
                        check,
                        "critical",
                        f"TTL expired (last output before timeout follows): {check.output}"
                        if check.output
                        else "TTL expired",
                    )
                    touched.add(check.service_name)
            if entry is not self._agent:
                continue
            for check in list(entry.checks.values()):
                since = check.critical_since
                if (
                    check.deregister_after
                    and since is not None
                    and now - since > check.deregister_after
                    and check.service_id in entry.services
                ):
                    self._remove_service(entry, check.service_id)
        if touched:
            self._write(touched)

    def _set_status(self, check: _Check, status: str, output: str) -> None:
        if status == "critical" and check.status != "critical":
            check.critical_since = self.clock.now()
        elif status != "critical":
            check.critical_since = None
        check.status = status
        check.output = output

    # --- writes and indexes ----------------------------------------------------------------------

    def _write(self, services: Iterable[str]) -> None:
        self.index += 1
        for name in services:
            self._service_index[name] = self.index
        self._catalog_index = self.index
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _reported(self, index: int) -> int:
        return 0 if self._index_zero else max(index, 1)

    def _remove_service(self, entry: _Node, service_id: str) -> None:
        service = entry.services.pop(service_id)
        for check_id in [c for c, ch in entry.checks.items() if ch.service_id == service_id]:
            del entry.checks[check_id]
        self._write({service["Service"]})

    def _service_record(self, fields: Json) -> Json:
        address = fields.get("Address") or ""
        port = fields.get("Port") or 0
        tagged = {**_tagged(address, port), **(fields.get("TaggedAddresses") or {})}
        return {
            "ID": fields["ID"],
            "Service": fields["Service"],
            "Tags": list(fields.get("Tags") or []),
            "Meta": dict(fields.get("Meta") or {}),
            "Address": address,
            "Port": port,
            "Weights": fields.get("Weights") or {"Passing": 1, "Warning": 1},
            "EnableTagOverride": bool(fields.get("EnableTagOverride")),
            "TaggedAddresses": tagged,
            "Kind": "",
            "CreateIndex": self.index,
            "ModifyIndex": self.index,
        }

    def _agent_view(self, service: Json) -> Json:
        return {
            "ID": service["ID"],
            "Service": service["Service"],
            "Tags": service["Tags"],
            "Meta": service["Meta"],
            "Port": service["Port"],
            "Address": service["Address"],
            "TaggedAddresses": service["TaggedAddresses"],
            "Weights": service["Weights"],
            "EnableTagOverride": service["EnableTagOverride"],
            "Datacenter": self.datacenter,
        }

    def _health_entries(self, name: str) -> list[Json]:
        entries = []
        for entry in self._nodes.values():
            for sid, service in entry.services.items():
                if service["Service"] != name:
                    continue
                checks = [c.view() for c in entry.checks.values() if c.service_id in ("", sid)]
                entries.append(
                    {
                        "Node": {
                            "ID": "",
                            "Node": entry.name,
                            "Address": entry.address,
                            "Datacenter": self.datacenter,
                            "TaggedAddresses": {"lan": entry.address, "wan": entry.address},
                            "Meta": dict(entry.meta),
                            "CreateIndex": entry.create_index,
                            "ModifyIndex": entry.modify_index,
                        },
                        "Service": dict(service),
                        "Checks": checks,
                    }
                )
        return entries

    # --- HTTP ------------------------------------------------------------------------------------

    def _add_routes(self) -> None:
        put, get = ("PUT",), ("GET",)
        table: list[tuple[str, tuple[str, ...], Callable[..., Awaitable[web.Response]]]] = [
            (r"/v1/agent/service/register", put, self._agent_register),
            (r"/v1/agent/service/deregister/(?P<id>.+)", put, self._agent_deregister),
            (r"/v1/agent/service/maintenance/(?P<id>.+)", put, self._agent_maintenance),
            (r"/v1/agent/check/(?P<op>pass|warn|fail)/(?P<id>.+)", put, self._agent_ttl),
            (r"/v1/agent/check/update/(?P<id>.+)", put, self._agent_update),
            (r"/v1/agent/services", get, self._agent_services),
            (r"/v1/agent/service/(?P<id>.+)", get, self._agent_service),
            (r"/v1/agent/checks", get, self._agent_checks),
            (r"/v1/agent/health/service/id/(?P<id>.+)", get, self._agent_health_id),
            (r"/v1/agent/health/service/name/(?P<name>.+)", get, self._agent_health_name),
            (r"/v1/agent/self", get, self._agent_self),
            (r"/v1/status/leader", get, self._leader),
            (r"/v1/catalog/register", put, self._catalog_register),
            (r"/v1/catalog/deregister", put, self._catalog_deregister),
            (r"/v1/catalog/services", get, self._catalog_services),
            (r"/v1/catalog/service/(?P<name>.*)", get, self._catalog_service),
            (r"/v1/health/service/(?P<name>.*)", get, self._health_service),
        ]
        self._routes = [(re.compile(p), m, h) for p, m, h in table]

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if self._site is None and request.transport is not None:
            # Accepted just before go_down(): a Consul that is down answers nothing.
            request.transport.abort()
            return web.Response(status=503)
        body = await request.read()
        self.requests.append(
            RecordedRequest(
                request.method,
                request.path,
                list(request.query.items()),
                dict(request.headers),
                body,
                time.monotonic(),
            )
        )
        self._active[id(request)] = request
        try:
            response = await self._answer(request)
        except ConsulFailure as failure:
            response = web.Response(
                status=failure.status,
                text=failure.text,
                content_type="text/plain",
                charset="utf-8",
                headers=failure.headers,
            )
        finally:
            self._active.pop(id(request), None)
        response.headers["X-Consul-Default-Acl-Policy"] = self.default_policy
        return response

    async def _answer(self, request: web.Request) -> web.Response:
        if self.slow:
            await asyncio.sleep(self.slow)
        if self.fail_with is not None:
            raise ConsulFailure(*self.fail_with)
        for pattern, methods, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            allow = ",".join(("OPTIONS", *methods))
            if request.method == "OPTIONS":
                return web.Response(headers={"Allow": allow})
            if request.method not in methods:
                raise ConsulFailure(405, f"method {request.method} not allowed", {"Allow": allow})
            return await handler(request, **match.groupdict())
        raise ConsulFailure(404, "Invalid URL path: not a recognized HTTP API endpoint\n")

    # --- ACL -------------------------------------------------------------------------------------

    def _token(self, request: web.Request) -> str:
        token = request.query.get("token") or request.headers.get("X-Consul-Token") or ""
        if not token:
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            if scheme == "Bearer" and value.strip():
                token = value.split()[0]
        return token

    def _resolve_token(self, request: web.Request) -> None:
        """Consul resolves the token first: an unknown one is a 403 on reads too (where a
        known token that may not read only gets filtered answers)."""
        token = self._token(request)
        if self.acl_tokens is not None and token and token not in self.acl_tokens:
            raise ConsulFailure(403, "ACL not found")

    def _authorize(self, request: web.Request, permission: str, name: str) -> None:
        if self.acl_tokens is None:
            return
        token = self._token(request)
        if not token:
            if self.default_policy == "allow":
                return
            raise ConsulFailure(
                403,
                f"Permission denied: anonymous token lacks permission '{permission}' on \"{name}\"",
            )
        policy = self.acl_tokens.get(token)
        if policy is None:
            raise ConsulFailure(403, "ACL not found")
        if self.default_policy == "allow" or policy.allows(permission, name):
            return
        raise ConsulFailure(
            403,
            f"Permission denied: token with AccessorID '{policy.accessor_id}' lacks permission "
            f"'{permission}' on \"{name}\"",
        )

    def _may_read(self, request: web.Request, name: str) -> bool:
        try:
            self._authorize(request, "service:read", name)
        except ConsulFailure:
            return False
        return True

    # --- agent -----------------------------------------------------------------------------------

    async def _agent_register(self, request: web.Request) -> web.Response:
        raw = _decode_object(await _body(request), _SERVICE_FIELDS)
        name = raw.get("Name")
        if not name:
            raise ConsulFailure(400, "Missing service name")
        sid = raw.get("ID") or name
        address = raw.get("Address") or ""
        if address in ("0.0.0.0", "::", "[::]"):
            raise ConsulFailure(400, "Invalid service address")
        weights = {"Passing": 1, "Warning": 1}
        if raw.get("Weights") is not None:
            given = _decode_object(raw["Weights"], _WEIGHT_FIELDS)
            weights.update(given)
            if weights["Passing"] < 1:
                raise ConsulFailure(400, "Invalid Weights: Passing must be greater than 0")
            if weights["Warning"] < 0:
                raise ConsulFailure(400, "Invalid Weights: Warning must be greater or equal than 0")
            if weights["Passing"] > 65535 or weights["Warning"] > 65535:
                raise ConsulFailure(400, "Invalid Weights: DNS Weight must be between 0 and 65535")
        meta = _validate_meta(raw.get("Meta"))
        tagged = raw.get("TaggedAddresses")
        if isinstance(tagged, dict):  # {name: {Address, Port}}, keys decoded like the rest
            tagged = {k: _decode_object(v, _ADDRESS_FIELDS) for k, v in tagged.items()}
        self._authorize(request, "service:write", name)
        definitions = []
        single = raw.get("Check")
        if single:
            definitions.append(_decode_object(single, _CHECK_FIELDS))
        for item in raw.get("Checks") or ():
            definitions.append(_decode_object(item, _CHECK_FIELDS))
        checks = [self._check_from(d) for d in definitions]
        for i, check in enumerate(checks, 1):
            if not check.check_id:
                check.check_id = f"service:{sid}" if len(checks) == 1 else f"service:{sid}:{i}"
            if not check.name:
                check.name = f"Service '{name}' check"
            check.service_id, check.service_name, check.node = sid, name, self.node
        replace = request.query.get("replace-existing-checks")
        if replace is not None and replace in ("", "true"):
            keep = {c.check_id for c in checks}
            for cid in [
                c for c, ch in self._agent.checks.items() if ch.service_id == sid and c not in keep
            ]:
                del self._agent.checks[cid]
        self.index += 1
        now = self.clock.now()
        for check in checks:
            old = self._agent.checks.get(check.check_id)
            if old is not None:  # the snapshot keeps status and output
                check.status, check.output = old.status, old.output
                check.critical_since = old.critical_since
                check.create_index = old.create_index
            else:
                check.create_index = self.index
                if check.status == "critical":
                    check.critical_since = now
            check.modify_index = self.index
            check.expires_at = now + check.ttl
            self._agent.checks[check.check_id] = check
        previous = self._agent.services.get(sid)
        record = self._service_record(
            {
                "ID": sid,
                "Service": name,
                "Tags": raw.get("Tags"),
                "Meta": meta,
                "Address": address,
                "Port": raw.get("Port") or 0,
                "Weights": weights,
                "EnableTagOverride": raw.get("EnableTagOverride"),
                "TaggedAddresses": tagged,
            }
        )
        if previous is not None:
            record["CreateIndex"] = previous["CreateIndex"]
        self._agent.services[sid] = record
        self._write({name} | ({previous["Service"]} if previous else set()))
        return web.Response()

    def _check_from(self, d: Json) -> _Check:
        try:
            ttl = parse_go_duration(d["TTL"]) if d.get("TTL") not in (None, "") else None
            interval = parse_go_duration(d.get("Interval") or 0)
            dereg = parse_go_duration(d.get("DeregisterCriticalServiceAfter") or 0)
        except ValueError as exc:
            raise ConsulFailure(400, f"Request decode failed: {exc}") from None
        typed = any(
            d.get(k)
            for k in ("HTTP", "TCP", "UDP", "ScriptArgs", "Args", "GRPC", "H2PING", "OSService")
        )
        if ttl is not None and ttl > 0 and interval > 0:
            raise ConsulFailure(400, "Invalid check: Interval and TTL cannot both be specified")
        if typed and interval <= 0:
            raise ConsulFailure(
                400,
                "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or "
                "OSService checks",
            )
        untyped = not typed and not d.get("AliasService") and not d.get("DockerContainerID")
        if untyped and (ttl is None or ttl <= 0):
            raise ConsulFailure(400, "Invalid check: TTL must be > 0 for TTL checks")
        warn, crit = d.get("FailuresBeforeWarning") or 0, d.get("FailuresBeforeCritical") or 0
        if warn > crit:
            raise ConsulFailure(
                400,
                "Invalid check: FailuresBeforeWarning can't be higher than FailuresBeforeCritical",
            )
        status = d.get("Status") or "critical"
        if status not in _STATUSES:
            raise ConsulFailure(400, "Status for checks must 'passing', 'warning', 'critical'")
        if dereg and dereg < DEREGISTER_MIN:
            dereg = DEREGISTER_MIN  # Consul logs a warning and uses its minimum
        return _Check(
            node=self.node,
            check_id=d.get("CheckID") or d.get("ID") or "",
            name=d.get("Name") or "",
            status=status,
            notes=d.get("Notes") or "",
            ttl=ttl or 0.0,
            interval=interval,
            deregister_after=dereg,
        )

    def _agent_check(self, check_id: str) -> _Check:
        check = self._agent.checks.get(check_id)
        if check is None or check_id == "serfHealth":  # serfHealth is the servers', not local
            raise ConsulFailure(
                404,
                f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the '
                "check name.",
            )
        return check

    def _unknown_service(self, sid: str) -> ConsulFailure:
        return ConsulFailure(
            404,
            f'Unknown service ID "{sid}". Ensure that the service ID is passed, not the '
            "service name.",
        )

    async def _agent_deregister(self, request: web.Request, id: str) -> web.Response:
        service = self._agent.services.get(id)
        if service is None:
            raise self._unknown_service(id)
        self._authorize(request, "service:write", service["Service"])
        self._remove_service(self._agent, id)
        return web.Response()

    async def _agent_maintenance(self, request: web.Request, id: str) -> web.Response:
        if "enable" not in request.query:
            raise ConsulFailure(400, "Missing value for enable")
        value = request.query["enable"]
        if value in _TRUE:
            enable = True
        elif value in _FALSE:
            enable = False
        else:
            raise ConsulFailure(400, f'Invalid value for enable: "{value}"')
        service = self._agent.services.get(id)
        if service is None:
            raise self._unknown_service(id)
        self._authorize(request, "service:write", service["Service"])
        cid = f"_service_maintenance:{id}"
        if enable and cid in self._agent.checks:
            return web.Response()  # already on: Consul keeps the first reason
        if enable:
            reason = request.query.get("reason") or (
                "Maintenance mode is enabled for this service, but no reason was provided. "
                "This is a default message."
            )
            self._agent.checks[cid] = _Check(
                self.node,
                cid,
                "Service Maintenance Mode",
                "critical",
                "",
                reason,
                id,
                service["Service"],
                critical_since=self.clock.now(),
            )
        else:
            self._agent.checks.pop(cid, None)
        self._write({service["Service"]})
        return web.Response()

    async def _agent_ttl(self, request: web.Request, op: str, id: str) -> web.Response:
        status = {"pass": "passing", "warn": "warning", "fail": "critical"}[op]
        return self._ttl_update(request, id, status, request.query.get("note", ""))

    async def _agent_update(self, request: web.Request, id: str) -> web.Response:
        raw = _decode_object(await _body(request), _UPDATE_FIELDS)
        status = raw.get("Status", "")
        if status not in _STATUSES:
            raise ConsulFailure(400, f"Invalid check status: '{status}'")
        return self._ttl_update(request, id, status, str(raw.get("Output") or ""))

    def _ttl_update(self, request: web.Request, cid: str, status: str, note: str) -> web.Response:
        check = self._agent_check(cid)
        self._authorize(request, "service:write", check.service_name or self.node)
        if not check.ttl:
            raise ConsulFailure(500, f'CheckID "{cid}" does not have associated TTL')
        self._set_status(check, status, note)
        check.expires_at = self.clock.now() + check.ttl
        check.modify_index = self.index + 1
        self._write({check.service_name})
        return web.Response()

    async def _agent_services(self, request: web.Request) -> web.Response:
        return _json(request, self.services())

    async def _agent_service(self, request: web.Request, id: str) -> web.Response:
        service = self._agent.services.get(id)
        if service is None:
            raise ConsulFailure(404, f"unknown service ID: {id}")
        view = self._agent_view(service)
        content_hash = f"{abs(hash(json.dumps(view, sort_keys=True))):016x}"[:16]
        response = _json(request, {**view, "ContentHash": content_hash})
        response.headers["X-Consul-ContentHash"] = content_hash
        return response

    async def _agent_checks(self, request: web.Request) -> web.Response:
        return _json(
            request, {cid: c.view() for cid, c in self._agent.checks.items() if c.service_id}
        )

    def _aggregate(self, sid: str) -> tuple[str, Json]:
        checks = [c for c in self._agent.checks.values() if c.service_id == sid]
        statuses = {c.status for c in checks}
        status = (
            "critical"
            if "critical" in statuses
            else "warning"
            if "warning" in statuses
            else "passing"
        )
        service = self._agent_view(self._agent.services[sid])
        return status, {
            "AggregatedStatus": status,
            "Service": service,
            "Checks": [c.view() for c in checks],
        }

    def _health_answer(self, request: web.Request, status: str, body: object) -> web.Response:
        code = {"passing": 200, "warning": 429, "critical": 503}[status]
        if _wants_text(request):
            return web.Response(status=code, text=status, content_type="text/plain")
        return _json(request, body, status=code)

    def _not_found(self, request: web.Request, reason: str, body: object) -> web.Response:
        """Consul's 404 here is a payload: the reason as text, else a JSON body."""
        if _wants_text(request):
            return web.Response(status=404, text=reason, content_type="text/plain")
        return _json(request, body, status=404)

    async def _agent_health_id(self, request: web.Request, id: str) -> web.Response:
        if id not in self._agent.services:
            reason = f"ServiceId {id} not found"
            unknown = {"AggregatedStatus": "critical", "Service": None, "Checks": None}
            return self._not_found(request, reason, unknown)
        status, body = self._aggregate(id)
        return self._health_answer(request, status, body)

    async def _agent_health_name(self, request: web.Request, name: str) -> web.Response:
        ids = [sid for sid, s in self._agent.services.items() if s["Service"] == name]
        if not ids:
            return self._not_found(request, f"ServiceName {name} Not Found", [])
        results = [self._aggregate(sid) for sid in ids]
        statuses = {s for s, _ in results}
        status = (
            "critical"
            if "critical" in statuses
            else "warning"
            if "warning" in statuses
            else "passing"
        )
        return self._health_answer(request, status, [b for _, b in results])

    async def _agent_self(self, request: web.Request) -> web.Response:
        return _json(
            request,
            {
                "Config": {"Datacenter": self.datacenter, "NodeName": self.node},
                "Member": {"Name": self.node, "Addr": "127.0.0.1", "Port": 8301, "Status": 1},
            },
        )

    async def _leader(self, request: web.Request) -> web.Response:
        return _json(request, "127.0.0.1:8300")

    # --- catalog ---------------------------------------------------------------------------------

    async def _catalog_register(self, request: web.Request) -> web.Response:
        raw = _decode_object(await _body(request), _CATALOG_FIELDS)
        node_name = raw.get("Node")
        # Catalog.Register's own checks come back over RPC as plain errors: a 500.
        if not node_name:
            raise ConsulFailure(500, "Must provide node")
        address = raw.get("Address") or ""
        if not address and not raw.get("SkipNodeUpdate"):
            raise ConsulFailure(500, "Must provide address if SkipNodeUpdate is not set")
        if raw.get("Datacenter") and raw["Datacenter"] != self.datacenter:
            raise ConsulFailure(500, "No path to datacenter")
        node_meta = _validate_meta(raw.get("NodeMeta"), "Node")
        self._authorize(request, "node:write", node_name)
        service = None
        if raw.get("Service"):
            service = _decode_object(raw["Service"], _CATALOG_SERVICE_FIELDS)
            if not service.get("Service"):
                raise ConsulFailure(400, "Must provide service name")
            service["Meta"] = _validate_meta(service.get("Meta"))
            service["ID"] = service.get("ID") or service["Service"]
            self._authorize(request, "service:write", service["Service"])
        definitions = []
        if raw.get("Check"):
            definitions.append(_decode_object(raw["Check"], _CHECK_FIELDS))
        for item in raw.get("Checks") or ():
            definitions.append(_decode_object(item, _CHECK_FIELDS))
        for d in definitions:
            if (d.get("Status") or "critical") not in _STATUSES:
                raise ConsulFailure(400, "Status for checks must 'passing', 'warning', 'critical'")
            if not (d.get("CheckID") or d.get("Name")):
                raise ConsulFailure(400, "Missing check ID")
        self.index += 1
        entry = self._nodes.get(node_name)
        if entry is None:
            entry = self._nodes[node_name] = _Node(node_name, address, create_index=self.index)
        if not raw.get("SkipNodeUpdate"):
            entry.address = address
            if raw.get("NodeMeta") is not None:
                entry.meta = node_meta
        entry.modify_index = self.index
        touched: set[str] = set()
        if service is not None:
            old = entry.services.get(service["ID"])
            record = self._service_record(service)
            if old is not None:
                record["CreateIndex"] = old["CreateIndex"]
                touched.add(old["Service"])
            entry.services[service["ID"]] = record
            touched.add(service["Service"])
        for d in definitions:
            cid = str(d.get("CheckID") or d.get("Name"))
            sid = str(d.get("ServiceID") or "")
            owner = entry.services.get(sid)
            if sid and owner is None:
                raise ConsulFailure(400, f'Unknown service ID "{sid}" for check')
            old_check = entry.checks.get(cid)
            check = _Check(
                node_name,
                cid,
                d.get("Name") or cid,
                d.get("Status") or "critical",
                str(d.get("Output") or ""),
                d.get("Notes") or "",
                sid,
                owner["Service"] if owner else "",
                create_index=old_check.create_index if old_check else self.index,
                modify_index=self.index,
                critical_since=old_check.critical_since if old_check else None,
            )
            if check.status == "critical" and check.critical_since is None:
                check.critical_since = self.clock.now()
            entry.checks[cid] = check
            if owner:
                touched.add(owner["Service"])
        self._write(touched)
        return _json(request, True)

    async def _catalog_deregister(self, request: web.Request) -> web.Response:
        raw = _decode_object(await _body(request), _DEREGISTER_FIELDS)
        node_name = raw.get("Node")
        if not node_name:
            raise ConsulFailure(500, "Must provide node")  # Catalog.Deregister's, over RPC
        self._authorize(request, "node:write", node_name)
        entry = self._nodes.get(node_name)
        if entry is None:
            return _json(request, True)  # nothing to remove: Consul answers true
        if raw.get("ServiceID"):
            service = entry.services.get(raw["ServiceID"])
            if service is not None:
                self._authorize(request, "service:write", service["Service"])
                self._remove_service(entry, raw["ServiceID"])
        elif raw.get("CheckID"):
            check = entry.checks.pop(raw["CheckID"], None)
            if check is not None:
                self._write({check.service_name})
        else:
            names = {s["Service"] for s in entry.services.values()}
            if entry is self._agent:
                entry.services.clear()
                entry.checks = {"serfHealth": entry.checks["serfHealth"]}
            else:
                del self._nodes[node_name]
            self._write(names)
        return _json(request, True)

    async def _catalog_services(self, request: web.Request) -> web.Response:
        def body() -> Json:
            names: dict[str, set[str]] = {}
            for entry in self._nodes.values():
                for service in entry.services.values():
                    if self._may_read(request, service["Service"]):
                        names.setdefault(service["Service"], set()).update(service["Tags"])
            return {"consul": [], **{n: sorted(t) for n, t in names.items()}}

        return await self._blocking(request, lambda: self._catalog_index, body)

    async def _catalog_service(self, request: web.Request, name: str) -> web.Response:
        if not name:
            raise ConsulFailure(400, "Missing service name")
        tags = request.query.getall("tag", [])

        def body() -> list[Json]:
            if not self._may_read(request, name):
                return []
            flat = []
            for entry in self._health_entries(name):
                node, service = entry["Node"], entry["Service"]
                if not set(tags) <= set(service["Tags"]):
                    continue
                flat.append(
                    {
                        "ID": "",
                        "Node": node["Node"],
                        "Address": node["Address"],
                        "Datacenter": self.datacenter,
                        "TaggedAddresses": node["TaggedAddresses"],
                        "NodeMeta": node["Meta"],
                        "ServiceID": service["ID"],
                        "ServiceName": service["Service"],
                        "ServiceTags": service["Tags"],
                        "ServiceAddress": service["Address"],
                        "ServiceMeta": service["Meta"],
                        "ServicePort": service["Port"],
                        "ServiceWeights": service["Weights"],
                        "ServiceEnableTagOverride": service["EnableTagOverride"],
                        "CreateIndex": service["CreateIndex"],
                        "ModifyIndex": service["ModifyIndex"],
                    }
                )
            return flat

        return await self._blocking(request, lambda: self._service_index.get(name, 1), body)

    async def _health_service(self, request: web.Request, name: str) -> web.Response:
        if not name:
            raise ConsulFailure(400, "Missing service name")
        passing = _parse_bool_flag(request, "passing", "Invalid value for ?passing")
        tags = request.query.getall("tag", [])
        if "filter" in request.query:
            raise ConsulFailure(
                400,
                "Failed to create boolean expression evaluator: ?filter is not supported "
                "by this test double",
            )

        def body() -> list[Json]:
            if not self._may_read(request, name):
                return []
            entries = []
            for entry in self._health_entries(name):
                if not set(tags) <= set(entry["Service"]["Tags"]):
                    continue
                if passing and any(c["Status"] != "passing" for c in entry["Checks"]):
                    continue
                entries.append(entry)
            return entries

        return await self._blocking(request, lambda: self._service_index.get(name, 1), body)

    async def _blocking(
        self, request: web.Request, index_of: Callable[[], int], body: Callable[[], object]
    ) -> web.Response:
        query = request.query
        self._resolve_token(request)
        dc = query.get("dc")
        if dc and dc != self.datacenter:
            raise ConsulFailure(500, "No path to datacenter")
        if "stale" in query and "consistent" in query:
            raise ConsulFailure(
                400, "Cannot specify ?stale with ?consistent, conflicting semantics."
            )
        min_index = 0
        if query.get("index"):
            text = query["index"]
            if not re.fullmatch(r"[0-9]+", text) or int(text) >= 2**64:
                raise ConsulFailure(400, "Invalid index")
            min_index = int(text)
        wait = 300.0
        if query.get("wait"):
            try:
                wait = parse_go_duration(query["wait"])
            except ValueError:
                raise ConsulFailure(400, "Invalid wait time") from None
        wait = min(wait, 600.0)
        if min_index > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait + random.uniform(0, wait / 16)
            epoch = self._epoch
            while index_of() <= min_index and self._epoch == epoch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await changed.wait()
        response = _json(request, body())
        response.headers["X-Consul-Index"] = str(self._reported(index_of()))
        response.headers["X-Consul-KnownLeader"] = "true"
        response.headers["X-Consul-LastContact"] = "0"
        return response

    def __repr__(self) -> str:
        return (
            f"<ConsulDouble {self.address} index={self.index} "
            f"services={sorted(self._agent.services)} nodes={sorted(self._nodes)}>"
        )


def _wants_text(request: web.Request) -> bool:
    if request.headers.get("Accept", "").startswith("text/plain"):
        return True
    return request.query.get("format") == "text"


def _json(request: web.Request, body: object, status: int = 200) -> web.Response:
    pretty = "pretty" in request.query
    # Go's json.Marshal is compact: no spaces after separators.
    text = json.dumps(body, indent=4) + "\n" if pretty else json.dumps(body, separators=(",", ":"))
    return web.Response(status=status, text=text, content_type="application/json")
