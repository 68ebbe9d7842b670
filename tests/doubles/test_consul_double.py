"""The Consul double pinned to `shared/reference/consul-http-api.md`, item by item: status
codes, Consul's plain-text wording, headers, and behaviour over real HTTP. Where the
reference is unsure, the double's choice is pinned and the test says so."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import consul.base
import pytest
from multidict import CIMultiDictProxy

from tests.doubles.consul import ConsulDouble, Policy

Json = dict[str, Any]

TEXT_PLAIN = "text/plain; charset=utf-8"
WRITER = "00000000-0000-0000-0000-000000000001"
READER = "00000000-0000-0000-0000-000000000002"
DEFAULT_MAINTENANCE_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. "
    "This is a default message."
)


@dataclass(frozen=True)
class Answer:
    """One HTTP answer from the double, read whole."""

    status: int
    text: str
    headers: CIMultiDictProxy[str]

    def json(self) -> Any:
        return json.loads(self.text)

    @property
    def index(self) -> int:
        return int(self.headers["X-Consul-Index"])


class Api:
    """Raw HTTP against the double, the way a Consul client speaks it."""

    def __init__(self, session: aiohttp.ClientSession, double: ConsulDouble) -> None:
        self.session = session
        self.double = double

    async def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        skip_auto_headers: tuple[str, ...] = (),
    ) -> Answer:
        sent = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method,
            self.double.address + path,
            data=data,
            headers=sent,
            skip_auto_headers=skip_auto_headers,
        ) as response:
            return Answer(response.status, await response.text(), response.headers)

    async def get(self, path: str, **kwargs: Any) -> Answer:
        return await self.call("GET", path, **kwargs)

    async def put(self, path: str, body: object = None, **kwargs: Any) -> Answer:
        return await self.call("PUT", path, body, **kwargs)

    async def register(self, service: Json, query: str = "", **kwargs: Any) -> Answer:
        return await self.put(f"/v1/agent/service/register{query}", service, **kwargs)

    async def registered(self, service: Json, query: str = "") -> None:
        """Register, insisting on Consul's success: 200 and an empty body."""
        answer = await self.register(service, query)
        assert (200, "") == (answer.status, answer.text)


@pytest.fixture
async def double() -> AsyncIterator[ConsulDouble]:
    consul_double = await ConsulDouble().start()
    try:
        yield consul_double
    finally:
        await consul_double.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def api(session: aiohttp.ClientSession, double: ConsulDouble) -> Api:
    return Api(session, double)


@pytest.fixture
async def acl_api(session: aiohttp.ClientSession) -> AsyncIterator[Api]:
    """A double with ACLs on, default policy deny: `writer` may write (and read) web,
    `reader` may only read web, `blind` may read nothing."""
    tokens = {
        "writer": Policy(accessor_id=WRITER, service_write=frozenset({"web"})),
        "reader": Policy(accessor_id=READER, service_read=frozenset({"web"})),
        "blind": Policy(service_read=frozenset()),
    }
    consul_double = await ConsulDouble(acl_tokens=tokens, default_policy="deny").start()
    try:
        yield Api(session, consul_double)
    finally:
        await consul_double.stop()


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `check()` holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def blocked(api: Api, path: str) -> asyncio.Task[Answer]:
    """Start a blocking query and return once the double holds it (it records a request
    before it blocks, with no await in between)."""
    seen = len(api.double.requests)
    task = asyncio.get_running_loop().create_task(api.get(path))
    await until(lambda: len(api.double.requests) > seen)
    done, _ = await asyncio.wait({task}, timeout=0.1)
    assert set() == done, "the query should still be blocked"
    return task


def ttl_service(sid: str = "web-1", name: str = "web", **check: Any) -> Json:
    return {"ID": sid, "Name": name, "Port": 8080, "Check": {"TTL": "10s", **check}}


# --- transport ------------------------------------------------------------------------------


PUT_ROUTES = [
    "/v1/agent/service/register",
    "/v1/agent/service/deregister/web-1",
    "/v1/agent/service/maintenance/web-1",
    "/v1/agent/check/pass/service:web-1",
    "/v1/agent/check/warn/service:web-1",
    "/v1/agent/check/fail/service:web-1",
    "/v1/agent/check/update/service:web-1",
    "/v1/catalog/register",
    "/v1/catalog/deregister",
]
GET_ROUTES = [
    "/v1/agent/services",
    "/v1/agent/service/web-1",
    "/v1/agent/checks",
    "/v1/agent/health/service/id/web-1",
    "/v1/agent/health/service/name/web",
    "/v1/health/service/web",
    "/v1/catalog/services",
    "/v1/catalog/service/web",
]


class TestTransport:
    async def test_unknown_v1_path_is_404_with_consuls_text(self, api: Api) -> None:
        """An unknown /v1 path: 404, `Invalid URL path: ...` with its newline, plain text."""
        answer = await api.get("/v1/agent/nonsense")
        assert 404 == answer.status
        assert "Invalid URL path: not a recognized HTTP API endpoint\n" == answer.text
        assert TEXT_PLAIN == answer.headers["Content-Type"]

    @pytest.mark.parametrize("path", PUT_ROUTES)
    @pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
    async def test_write_routes_are_put_only(self, api: Api, path: str, method: str) -> None:
        """Every agent/catalog write is PUT only: 405 `method X not allowed`, Allow OPTIONS,PUT."""
        answer = await api.call(method, path)
        assert (405, f"method {method} not allowed") == (answer.status, answer.text)
        assert "OPTIONS,PUT" == answer.headers["Allow"]
        assert TEXT_PLAIN == answer.headers["Content-Type"]

    @pytest.mark.parametrize("path", GET_ROUTES)
    async def test_read_routes_are_get_only(self, api: Api, path: str) -> None:
        """Reads are GET only: 405 with `Allow: OPTIONS,GET` (Consul puts OPTIONS first)."""
        answer = await api.put(path)
        assert (405, "method PUT not allowed") == (answer.status, answer.text)
        assert "OPTIONS,GET" == answer.headers["Allow"]

    @pytest.mark.parametrize(
        ("path", "allow"),
        [("/v1/agent/service/register", "OPTIONS,PUT"), ("/v1/health/service/web", "OPTIONS,GET")],
    )
    async def test_options_is_200_with_allow(self, api: Api, path: str, allow: str) -> None:
        """OPTIONS on a known route: 200, empty body, the route's `Allow`."""
        answer = await api.call("OPTIONS", path)
        assert (200, "", allow) == (answer.status, answer.text, answer.headers["Allow"])

    async def test_successful_writes_are_200_with_an_empty_body(self, api: Api) -> None:
        """Register, check pass/warn/fail/update, maintenance and deregister: 200, no body."""
        await api.registered(ttl_service())
        writes = [
            await api.put("/v1/agent/check/pass/service:web-1"),
            await api.put("/v1/agent/check/warn/service:web-1"),
            await api.put("/v1/agent/check/fail/service:web-1"),
            await api.put("/v1/agent/check/update/service:web-1", {"Status": "passing"}),
            await api.put("/v1/agent/service/maintenance/web-1?enable=true"),
            await api.put("/v1/agent/service/maintenance/web-1?enable=false"),
            await api.put("/v1/agent/service/deregister/web-1"),
        ]
        assert [(200, "")] * len(writes) == [(a.status, a.text) for a in writes]

    async def test_errors_are_plain_text_not_json(self, api: Api) -> None:
        """An error body is Consul's reason string as text/plain; charset=utf-8."""
        answer = await api.register({"Port": 80})
        assert (400, "Missing service name") == (answer.status, answer.text)
        assert TEXT_PLAIN == answer.headers["Content-Type"]

    @pytest.mark.parametrize(
        "content_type", ["text/plain; charset=utf-8", "application/x-www-form-urlencoded", None]
    )
    async def test_json_is_read_whatever_the_content_type(
        self, api: Api, double: ConsulDouble, content_type: str | None
    ) -> None:
        """The body is JSON whatever Content-Type says (python-consul2 sends text/plain)."""
        headers = {} if content_type is None else {"Content-Type": content_type}
        answer = await api.put(
            "/v1/agent/service/register",
            data=json.dumps({"Name": "web", "Port": 80}).encode(),
            headers=headers,
            skip_auto_headers=("Content-Type",),
        )
        assert (200, "") == (answer.status, answer.text)
        assert ["web"] == list(double.services())

    @pytest.mark.parametrize(
        "path",
        [
            "/v1/agent/service/register",
            "/v1/agent/services",
            "/v1/agent/service/nope",
            "/v1/health/service/web",
        ],
    )
    async def test_every_answer_names_the_default_acl_policy(self, api: Api, path: str) -> None:
        """`X-Consul-Default-Acl-Policy` is on every wrapped endpoint's answer, errors too."""
        answer = await api.call("GET", path)
        assert "allow" == answer.headers["X-Consul-Default-Acl-Policy"]

    async def test_pretty_is_indented_with_a_newline_else_compact(self, api: Api) -> None:
        """`?pretty`: 4-space indented JSON plus a newline; otherwise Go's compact JSON."""
        await api.registered({"Name": "web", "Port": 80})
        compact = await api.get("/v1/agent/services")
        pretty = await api.get("/v1/agent/services?pretty")
        assert json.dumps(compact.json(), separators=(",", ":")) == compact.text
        assert json.dumps(pretty.json(), indent=4) + "\n" == pretty.text
        assert "application/json" == compact.headers["Content-Type"].split(";")[0]


# --- decoding -----------------------------------------------------------------------------


class TestDecoding:
    @pytest.mark.parametrize("key", ["name", "Name", "NAME", "nAmE"])
    async def test_keys_are_case_insensitive(
        self, api: Api, double: ConsulDouble, key: str
    ) -> None:
        """`name`, `Name`, `NAME`: all the same field."""
        await api.registered({key: "web", "port": 80, "TAGS": ["a"]})
        assert {"Service": "web", "Port": 80, "Tags": ["a"]}.items() <= double.services()[
            "web"
        ].items()

    async def test_snake_case_aliases_are_accepted(self, api: Api, double: ConsulDouble) -> None:
        """`enable_tag_override`, `tagged_addresses`, and the check's snake_case keys."""
        await api.registered(
            {
                "name": "web",
                "id": "web-1",
                "enable_tag_override": True,
                "tagged_addresses": {"lan": {"address": "10.0.0.9", "port": 81}},
                "check": {
                    "ttl": "10s",
                    "deregister_critical_service_after": "90s",
                    "tls_skip_verify": True,
                    "grpc_use_tls": False,
                    "docker_container_id": "",
                },
            }
        )
        service = double.services()["web-1"]
        assert True is service["EnableTagOverride"]
        assert {"Address": "10.0.0.9", "Port": 81} == service["TaggedAddresses"]["lan"]
        assert 90.0 == double.checks()["service:web-1"]["DeregisterAfter"]

    async def test_an_unknown_top_level_field_is_400(self, api: Api) -> None:
        """An unknown key: 400 `Request decode failed: json: unknown field "foo"`."""
        answer = await api.register({"Name": "web", "foo": 1})
        assert (400, 'Request decode failed: json: unknown field "foo"') == (
            answer.status,
            answer.text,
        )

    async def test_an_unknown_check_field_is_400(self, api: Api) -> None:
        """An unknown key inside a check is rejected the same way."""
        answer = await api.register({"Name": "web", "Checks": [{"TTL": "10s", "Bar": 1}]})
        assert (400, 'Request decode failed: json: unknown field "Bar"') == (
            answer.status,
            answer.text,
        )

    async def test_an_unknown_weights_field_is_400(self, api: Api) -> None:
        """Nested structs reject unknown keys too (reference unsure; the double's choice)."""
        answer = await api.register({"Name": "web", "Weights": {"Passing": 1, "Heavy": 2}})
        assert (400, 'Request decode failed: json: unknown field "Heavy"') == (
            answer.status,
            answer.text,
        )

    @pytest.mark.parametrize("body", [b"", b"  \n"])
    async def test_an_empty_body_is_eof(self, api: Api, body: bytes) -> None:
        """No JSON at all: 400 `Request decode failed: EOF`."""
        answer = await api.put("/v1/agent/service/register", data=body)
        assert (400, "Request decode failed: EOF") == (answer.status, answer.text)

    @pytest.mark.parametrize(
        ("ttl", "seconds"),
        [
            ("10s", 10.0),
            ("1m30s", 90.0),
            ("500ms", 0.5),
            ("1h", 3600.0),
            ("1.5s", 1.5),
            (".5s", 0.5),
            ("250000us", 0.25),
            (300_000_000, 0.3),
            (2e9, 2.0),
        ],
    )
    async def test_durations_are_go_strings_or_nanoseconds(
        self, api: Api, double: ConsulDouble, ttl: object, seconds: float
    ) -> None:
        """Strings parse like time.ParseDuration; a JSON number is nanoseconds."""
        await api.registered({"Name": "web", "Check": {"TTL": ttl}})
        assert seconds == pytest.approx(double.checks()["service:web"]["TTL"])

    @pytest.mark.parametrize(
        ("ttl", "error"),
        [
            ("abc", 'time: invalid duration "abc"'),
            ("10", 'time: missing unit in duration "10"'),
            ("10x", 'time: unknown unit "x" in duration "10x"'),
        ],
    )
    async def test_a_bad_duration_is_a_decode_error_in_gos_words(
        self, api: Api, ttl: str, error: str
    ) -> None:
        """A string Go cannot parse fails the decode with Go's message."""
        answer = await api.register({"Name": "web", "Check": {"TTL": ttl}})
        assert (400, f"Request decode failed: {error}") == (answer.status, answer.text)


# --- agent service register ---------------------------------------------------------------


def meta_error(key: str, value: str, reason: str) -> str:
    return f"Invalid Service Meta: Couldn't load metadata pair ('{key}', '{value}'): {reason}"


class TestRegisterValidation:
    @pytest.mark.parametrize(
        ("service", "message"),
        [
            ({"Port": 80}, "Missing service name"),
            ({"Name": ""}, "Missing service name"),
            ({"Name": "web", "Address": "0.0.0.0"}, "Invalid service address"),
            ({"Name": "web", "Address": "::"}, "Invalid service address"),
            ({"Name": "web", "Address": "[::]"}, "Invalid service address"),
            (
                {"Name": "web", "Weights": {"Passing": 0, "Warning": 1}},
                "Invalid Weights: Passing must be greater than 0",
            ),
            (
                {"Name": "web", "Weights": {"Passing": 1, "Warning": -1}},
                "Invalid Weights: Warning must be greater or equal than 0",
            ),
            (
                {"Name": "web", "Weights": {"Passing": 65536, "Warning": 1}},
                "Invalid Weights: DNS Weight must be between 0 and 65535",
            ),
            (
                {"Name": "web", "Weights": {"Passing": 1, "Warning": 65536}},
                "Invalid Weights: DNS Weight must be between 0 and 65535",
            ),
        ],
    )
    async def test_service_fields(self, api: Api, service: Json, message: str) -> None:
        """Name, Address and Weights are checked with Consul's exact 400 texts."""
        answer = await api.register(service)
        assert (400, message) == (answer.status, answer.text)

    @pytest.mark.parametrize(
        ("key", "value", "reason"),
        [
            ("a.b", "v", "Key contains invalid characters"),
            ("a b", "v", "Key contains invalid characters"),
            ("ab\n", "v", "Key contains invalid characters"),
            ("", "v", "Key cannot be blank"),
            ("k" * 129, "v", "Key is too long (limit: 128 characters)"),
            ("consul-version", "v", "Key prefix 'consul-' is reserved for internal use"),
            ("k", "v" * 513, "Value is too long (limit: 512 characters)"),
            ("k", "\u00e9" * 257, "Value is too long (limit: 512 characters)"),
        ],
    )
    async def test_meta_pairs(self, api: Api, key: str, value: str, reason: str) -> None:
        """Meta keys `^[a-zA-Z0-9_-]+$` up to 128, values up to 512 bytes, no `consul-`."""
        answer = await api.register({"Name": "web", "Meta": {key: value}})
        assert (400, meta_error(key, value, reason)) == (answer.status, answer.text)

    async def test_meta_limits_are_inclusive(self, api: Api) -> None:
        """A 128-character key, a 512-byte value and 64 pairs are all still fine."""
        meta = {f"k{i}": "v" for i in range(62)} | {"k" * 128: "v", "long": "v" * 512}
        await api.registered({"Name": "web", "Meta": meta})

    async def test_more_than_64_meta_pairs(self, api: Api) -> None:
        """65 pairs: 400; the service wording is unsure in the reference, so the double's."""
        answer = await api.register({"Name": "web", "Meta": {f"k{i}": "v" for i in range(65)}})
        expected = (
            "Invalid Service Meta: Service metadata cannot contain more than 64 key/value pairs"
        )
        assert (400, expected) == (answer.status, answer.text)

    @pytest.mark.parametrize(
        ("check", "reason"),
        [
            ({"TTL": "10s", "Interval": "10s"}, "Interval and TTL cannot both be specified"),
            (
                {"HTTP": "http://127.0.0.1:8080/health"},
                "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
            ),
            (
                {"TCP": "127.0.0.1:8080", "Interval": "0s"},
                "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
            ),
            ({"Notes": "no type"}, "TTL must be > 0 for TTL checks"),
            ({"TTL": "0s"}, "TTL must be > 0 for TTL checks"),
            ({"TTL": "-1s"}, "TTL must be > 0 for TTL checks"),
            (
                {"TTL": "10s", "FailuresBeforeWarning": 3, "FailuresBeforeCritical": 2},
                "FailuresBeforeWarning can't be higher than FailuresBeforeCritical",
            ),
            (
                {"TTL": "10s", "FailuresBeforeWarning": 1},
                "FailuresBeforeWarning can't be higher than FailuresBeforeCritical",
            ),
        ],
    )
    async def test_check_validation(self, api: Api, check: Json, reason: str) -> None:
        """Each invalid check: 400 `Invalid check: <reason>`, for `Check` and `Checks`."""
        single = await api.register({"Name": "web", "Check": check})
        listed = await api.register({"Name": "web", "Checks": [{"TTL": "5s"}, check]})
        expected = (400, f"Invalid check: {reason}")
        assert [expected, expected] == [(a.status, a.text) for a in (single, listed)]

    async def test_interval_with_a_zero_ttl_is_not_both(self, api: Api) -> None:
        """`Interval and TTL cannot both be specified` needs both above zero."""
        await api.registered(
            {"Name": "web", "Check": {"HTTP": "http://127.0.0.1/", "Interval": "10s", "TTL": "0s"}}
        )

    async def test_a_bad_check_status_is_400(self, api: Api) -> None:
        """A Status outside passing/warning/critical: Consul's (ungrammatical) 400."""
        answer = await api.register({"Name": "web", "Check": {"TTL": "10s", "Status": "ok"}})
        expected = (400, "Status for checks must 'passing', 'warning', 'critical'")
        assert expected == (answer.status, answer.text)

    async def test_an_empty_check_object_is_ignored(self, api: Api, double: ConsulDouble) -> None:
        """`"Check": {}` is no check at all (it would fail validation otherwise)."""
        await api.registered({"Name": "web", "Check": {}})
        assert {} == double.checks()


class TestRegister:
    async def test_id_defaults_to_name(self, api: Api, double: ConsulDouble) -> None:
        """Without an ID the service's ID is its Name."""
        await api.registered({"Name": "web", "Port": 80})
        assert ("web", "web") == (
            double.services()["web"]["ID"],
            double.services()["web"]["Service"],
        )

    async def test_same_id_again_overwrites(self, api: Api, double: ConsulDouble) -> None:
        """Registering an ID again updates it in place; it is idempotent."""
        await api.registered({"ID": "web-1", "Name": "web", "Port": 80})
        await api.registered({"ID": "web-1", "Name": "web", "Port": 81, "Tags": ["v2"]})
        await api.registered({"ID": "web-1", "Name": "web", "Port": 81, "Tags": ["v2"]})
        services = double.services()
        assert ["web-1"] == list(services)
        assert (81, ["v2"]) == (services["web-1"]["Port"], services["web-1"]["Tags"])

    async def test_defaults_and_normalised_views(self, api: Api) -> None:
        """Tags [] and Meta {} (never null), Weights {1, 1} in the agent's view."""
        await api.registered({"Name": "web", "Tags": None, "Meta": None})
        service = (await api.get("/v1/agent/services")).json()["web"]
        assert ([], {}) == (service["Tags"], service["Meta"])
        assert {"Passing": 1, "Warning": 1} == service["Weights"]
        one = (await api.get("/v1/agent/service/web")).json()
        assert ([], {}) == (one["Tags"], one["Meta"])

    async def test_a_single_check_gets_service_id(self, api: Api, double: ConsulDouble) -> None:
        """One check without an ID: `service:<id>`, named `Service '<name>' check`."""
        await api.registered(ttl_service())
        check = double.checks()["service:web-1"]
        assert ("Service 'web' check", "web-1", "web") == (
            check["Name"],
            check["ServiceID"],
            check["ServiceName"],
        )

    async def test_several_checks_are_numbered_check_first(
        self, api: Api, double: ConsulDouble
    ) -> None:
        """More than one: `service:<id>:1`, `:2`, ... in order `Check` then `Checks`."""
        await api.registered(
            {
                "ID": "web-1",
                "Name": "web",
                "Check": {"TTL": "1s"},
                "Checks": [{"TTL": "2s"}, {"TTL": "3s", "CheckID": "own"}, {"TTL": "4s"}],
            }
        )
        ttls = {cid: c["TTL"] for cid, c in double.checks().items()}
        expected = {"service:web-1:1": 1.0, "service:web-1:2": 2.0, "own": 3.0}
        assert expected | {"service:web-1:4": 4.0} == ttls

    async def test_new_checks_start_critical_unless_status(
        self, api: Api, double: ConsulDouble
    ) -> None:
        """A new check is critical; `Status` picks another start."""
        await api.registered(
            {
                "Name": "web",
                "Checks": [
                    {"CheckID": "a", "TTL": "10s"},
                    {"CheckID": "b", "TTL": "10s", "Status": "passing"},
                    {"CheckID": "c", "TTL": "10s", "Status": "warning"},
                ],
            }
        )
        statuses = {cid: c["Status"] for cid, c in double.checks().items()}
        assert {"a": "critical", "b": "passing", "c": "warning"} == statuses

    async def test_reregister_keeps_status_and_output(self, api: Api, double: ConsulDouble) -> None:
        """Registering again keeps an existing check's status and output (even over Status)."""
        await api.registered(ttl_service())
        await api.put("/v1/agent/check/warn/service:web-1?note=slow")
        await api.registered(ttl_service(Status="passing"))
        check = double.checks()["service:web-1"]
        assert ("warning", "slow") == (check["Status"], check["Output"])

    async def test_old_checks_stay_without_replace(self, api: Api, double: ConsulDouble) -> None:
        """Without `replace-existing-checks`, checks missing from the request stay."""
        two = {
            "Name": "web",
            "Checks": [{"CheckID": "a", "TTL": "9s"}, {"CheckID": "b", "TTL": "9s"}],
        }
        await api.registered(two)
        await api.registered({"Name": "web", "Checks": [{"CheckID": "a", "TTL": "9s"}]})
        await api.registered(
            {"Name": "web", "Checks": [{"CheckID": "a", "TTL": "9s"}]},
            "?replace-existing-checks=false",
        )
        assert ["a", "b"] == sorted(double.checks())

    @pytest.mark.parametrize("query", ["?replace-existing-checks", "?replace-existing-checks=true"])
    async def test_replace_existing_checks_removes_the_rest(
        self, api: Api, double: ConsulDouble, query: str
    ) -> None:
        """With `replace-existing-checks` (bare or `=true`) checks not in the request go."""
        two = {
            "Name": "web",
            "Checks": [{"CheckID": "a", "TTL": "9s"}, {"CheckID": "b", "TTL": "9s"}],
        }
        await api.registered(two)
        await api.registered({"Name": "web", "Checks": [{"CheckID": "a", "TTL": "9s"}]}, query)
        assert ["a"] == sorted(double.checks())

    @pytest.mark.parametrize(("address", "suffix"), [("10.1.2.3", "ipv4"), ("2001:db8::7", "ipv6")])
    async def test_ip_literals_get_tagged_addresses(
        self, api: Api, address: str, suffix: str
    ) -> None:
        """An IP literal Address adds lan_/wan_ipv4 (or _ipv6) {Address, Port}."""
        await api.registered({"Name": "web", "Address": address, "Port": 8080})
        tagged = (await api.get("/v1/agent/services")).json()["web"]["TaggedAddresses"]
        both = {"Address": address, "Port": 8080}
        assert {f"lan_{suffix}": both, f"wan_{suffix}": both} == tagged

    async def test_a_hostname_gets_no_tagged_addresses(self, api: Api) -> None:
        """A hostname is not an IP literal: nothing is added."""
        await api.registered({"Name": "web", "Address": "web.internal", "Port": 8080})
        assert {} == (await api.get("/v1/agent/services")).json()["web"]["TaggedAddresses"]

    async def test_supplied_tagged_addresses_win_per_key(self, api: Api) -> None:
        """Supplied keys are kept; only the missing ipv4 keys are added."""
        given = {
            "lan": {"Address": "web.lan", "Port": 1},
            "wan_ipv4": {"Address": "1.2.3.4", "Port": 2},
        }
        await api.registered(
            {"Name": "web", "Address": "10.1.2.3", "Port": 8080, "TaggedAddresses": given}
        )
        tagged = (await api.get("/v1/agent/services")).json()["web"]["TaggedAddresses"]
        assert given | {"lan_ipv4": {"Address": "10.1.2.3", "Port": 8080}} == tagged


# --- deregister, checks, TTL, reaping, maintenance ----------------------------------------------


class TestDeregister:
    async def test_known_service_and_its_checks_go(self, api: Api, double: ConsulDouble) -> None:
        """Deregistering a known ID: 200, the service and all its checks are gone."""
        await api.registered(ttl_service())
        answer = await api.put("/v1/agent/service/deregister/web-1")
        assert (200, "") == (answer.status, answer.text)
        assert ({}, {}) == (double.services(), double.checks())

    async def test_unknown_service_is_404(self, api: Api) -> None:
        """An unknown ID: 404 with recent Consul's hint about IDs and names."""
        answer = await api.put("/v1/agent/service/deregister/nope")
        expected = (
            'Unknown service ID "nope". Ensure that the service ID is passed, not the service name.'
        )
        assert (404, expected) == (answer.status, answer.text)
        assert TEXT_PLAIN == answer.headers["Content-Type"]


class TestChecks:
    @pytest.mark.parametrize(
        ("op", "status"), [("pass", "passing"), ("warn", "warning"), ("fail", "critical")]
    )
    async def test_pass_warn_fail_set_status_and_note(
        self, api: Api, double: ConsulDouble, op: str, status: str
    ) -> None:
        """pass/warn/fail set the status; `?note=` becomes the Output."""
        await api.registered(ttl_service(Status="warning" if op == "pass" else "passing"))
        answer = await api.put(f"/v1/agent/check/{op}/service:web-1?note={quote('all good?')}")
        assert (200, "") == (answer.status, answer.text)
        check = double.checks()["service:web-1"]
        assert (status, "all good?") == (check["Status"], check["Output"])

    @pytest.mark.parametrize("op", ["pass", "warn", "fail"])
    async def test_unknown_check_is_404(self, api: Api, op: str) -> None:
        """An unknown check ID: 404 with the hint about IDs and names."""
        answer = await api.put(f"/v1/agent/check/{op}/nope")
        expected = (
            'Unknown check ID "nope". Ensure that the check ID is passed, not the check name.'
        )
        assert (404, expected) == (answer.status, answer.text)

    async def test_serf_health_is_not_an_agent_check(self, api: Api) -> None:
        """serfHealth lives in the catalog, not in the agent's checks: 404 like any unknown."""
        answer = await api.put("/v1/agent/check/pass/serfHealth")
        assert 404 == answer.status

    async def test_a_check_without_ttl_is_500(self, api: Api) -> None:
        """An existing check that is not a TTL check: 500 `... does not have associated TTL`."""
        await api.registered(
            {
                "ID": "web-1",
                "Name": "web",
                "Check": {"HTTP": "http://127.0.0.1/", "Interval": "10s"},
            }
        )
        answer = await api.put("/v1/agent/check/pass/service:web-1")
        assert (500, 'CheckID "service:web-1" does not have associated TTL') == (
            answer.status,
            answer.text,
        )

    @pytest.mark.parametrize("status", ["passing", "warning", "critical"])
    async def test_update_sets_status_and_output(
        self, api: Api, double: ConsulDouble, status: str
    ) -> None:
        """check/update takes {"Status", "Output"} (keys in any case)."""
        await api.registered(ttl_service())
        answer = await api.put(
            "/v1/agent/check/update/service:web-1", {"status": status, "OUTPUT": "why"}
        )
        assert (200, "") == (answer.status, answer.text)
        check = double.checks()["service:web-1"]
        assert (status, "why") == (check["Status"], check["Output"])

    @pytest.mark.parametrize(("body", "shown"), [({"Status": "foo"}, "foo"), ({"Output": "x"}, "")])
    async def test_update_with_a_bad_status_is_400(self, api: Api, body: Json, shown: str) -> None:
        """A Status that is not one of the three: 400 `Invalid check status: '<status>'`."""
        await api.registered(ttl_service())
        answer = await api.put("/v1/agent/check/update/service:web-1", body)
        assert (400, f"Invalid check status: '{shown}'") == (answer.status, answer.text)

    async def test_update_of_an_unknown_check_is_404(self, api: Api) -> None:
        """A good status for an unknown check: the 404 of pass/warn/fail."""
        answer = await api.put("/v1/agent/check/update/nope", {"Status": "passing"})
        assert 404 == answer.status

    async def test_update_with_an_unknown_field_is_400(self, api: Api) -> None:
        """The update body is decoded strictly too."""
        await api.registered(ttl_service())
        answer = await api.put(
            "/v1/agent/check/update/service:web-1", {"Status": "passing", "Note": "x"}
        )
        assert (400, 'Request decode failed: json: unknown field "Note"') == (
            answer.status,
            answer.text,
        )


class TestTtl:
    async def test_expiry_turns_critical_with_the_last_output(
        self, api: Api, double: ConsulDouble
    ) -> None:
        """A missed TTL (300ms, real time): critical, Output `TTL expired (...): <last>`."""
        await api.registered(ttl_service(TTL="300ms"))
        await api.put(
            "/v1/agent/check/update/service:web-1", {"Status": "passing", "Output": "ok 1"}
        )
        await until(lambda: double.checks()["service:web-1"]["Status"] == "critical")
        expected = "TTL expired (last output before timeout follows): ok 1"
        assert expected == double.checks()["service:web-1"]["Output"]

    async def test_expiry_without_output_says_ttl_expired(
        self, api: Api, double: ConsulDouble
    ) -> None:
        """No output before the timeout: the Output is just `TTL expired`."""
        await api.registered(ttl_service(TTL="300ms", Status="passing"))
        await until(lambda: double.checks()["service:web-1"]["Status"] == "critical")
        assert "TTL expired" == double.checks()["service:web-1"]["Output"]

    async def test_expiry_also_fires_on_a_critical_check(
        self, api: Api, double: ConsulDouble
    ) -> None:
        """The TTL timer fires whatever the status: a failed check gets the expiry output."""
        await api.registered(ttl_service(TTL="300ms"))
        await api.put("/v1/agent/check/fail/service:web-1?note=down")
        await until(lambda: double.checks()["service:web-1"]["Output"] != "down")
        check = double.checks()["service:web-1"]
        expected = ("critical", "TTL expired (last output before timeout follows): down")
        assert expected == (check["Status"], check["Output"])

    async def test_an_update_resets_the_timer(self, api: Api, double: ConsulDouble) -> None:
        """pass restarts the TTL: 8s + pass + 8s is still passing; 3s more is not."""
        await api.registered(ttl_service(Status="passing"))
        await double.clock.advance(8)
        await api.put("/v1/agent/check/pass/service:web-1?note=alive")
        await double.clock.advance(8)
        assert "passing" == double.checks()["service:web-1"]["Status"]
        await double.clock.advance(3)
        check = double.checks()["service:web-1"]
        expected = ("critical", "TTL expired (last output before timeout follows): alive")
        assert expected == (check["Status"], check["Output"])


class TestReaping:
    async def test_critical_longer_than_the_limit_is_reaped(
        self, api: Api, double: ConsulDouble
    ) -> None:
        """DeregisterCriticalServiceAfter: critical for longer removes service and checks."""
        await api.registered(
            {
                "ID": "web-1",
                "Name": "web",
                "Checks": [
                    {"CheckID": "a", "TTL": "10s", "DeregisterCriticalServiceAfter": "2m"},
                    {"CheckID": "b", "TTL": "10s", "Status": "passing"},
                ],
            }
        )
        await double.clock.advance(110)
        assert ["web-1"] == list(double.services())
        await double.clock.advance(11)
        assert ({}, {}) == (double.services(), double.checks())

    async def test_the_limit_is_at_least_one_minute(self, api: Api, double: ConsulDouble) -> None:
        """A value under 1m is raised to Consul's minimum of 1m."""
        await api.registered(ttl_service(DeregisterCriticalServiceAfter="10s"))
        assert 60.0 == double.checks()["service:web-1"]["DeregisterAfter"]
        await double.clock.advance(30)
        assert ["web-1"] == list(double.services())
        await double.clock.advance(31)
        assert {} == double.services()

    async def test_the_clock_counts_from_turning_critical(
        self, api: Api, double: ConsulDouble
    ) -> None:
        """A passing check only starts the count when its TTL expires."""
        await api.registered(ttl_service(Status="passing", DeregisterCriticalServiceAfter="1m"))
        await double.clock.advance(11)  # TTL expired: critical from here
        await double.clock.advance(50)
        assert ["web-1"] == list(double.services())
        await double.clock.advance(11)
        assert {} == double.services()


class TestMaintenance:
    async def test_missing_enable_is_400(self, api: Api) -> None:
        """No `enable`: 400 `Missing value for enable`."""
        await api.registered({"ID": "web-1", "Name": "web"})
        answer = await api.put("/v1/agent/service/maintenance/web-1")
        assert (400, "Missing value for enable") == (answer.status, answer.text)

    @pytest.mark.parametrize("value", ["maybe", "", "yes"])
    async def test_unparsable_enable_is_400(self, api: Api, value: str) -> None:
        """`enable` must parse as a Go bool: 400 `Invalid value for enable: "<value>"`."""
        await api.registered({"ID": "web-1", "Name": "web"})
        answer = await api.put(f"/v1/agent/service/maintenance/web-1?enable={value}")
        assert (400, f'Invalid value for enable: "{value}"') == (answer.status, answer.text)

    async def test_unknown_service_is_404(self, api: Api) -> None:
        """An unknown service: 404."""
        answer = await api.put("/v1/agent/service/maintenance/nope?enable=true")
        expected = (
            'Unknown service ID "nope". Ensure that the service ID is passed, not the service name.'
        )
        assert (404, expected) == (answer.status, answer.text)

    @pytest.mark.parametrize("on", ["true", "1", "t", "TRUE", "True"])
    async def test_enable_adds_a_critical_check_with_default_notes(
        self, api: Api, double: ConsulDouble, on: str
    ) -> None:
        """Enable adds critical `_service_maintenance:<id>` with Consul's default Notes."""
        await api.registered({"ID": "web-1", "Name": "web"})
        await api.put(f"/v1/agent/service/maintenance/web-1?enable={on}")
        check = double.checks()["_service_maintenance:web-1"]
        expected = ("critical", DEFAULT_MAINTENANCE_REASON, "web-1")
        assert expected == (check["Status"], check["Notes"], check["ServiceID"])

    async def test_enable_is_idempotent_and_keeps_the_first_reason(
        self, api: Api, double: ConsulDouble
    ) -> None:
        """Enabling again changes nothing: the first reason stays."""
        await api.registered({"ID": "web-1", "Name": "web"})
        await api.put("/v1/agent/service/maintenance/web-1?enable=true&reason=deploy")
        again = await api.put("/v1/agent/service/maintenance/web-1?enable=true&reason=other")
        assert (200, "") == (again.status, again.text)
        assert "deploy" == double.checks()["_service_maintenance:web-1"]["Notes"]

    @pytest.mark.parametrize("off", ["false", "0", "f"])
    async def test_disable_removes_the_check(
        self, api: Api, double: ConsulDouble, off: str
    ) -> None:
        """Disable removes the maintenance check; the service stays."""
        await api.registered({"ID": "web-1", "Name": "web"})
        await api.put("/v1/agent/service/maintenance/web-1?enable=true")
        await api.put(f"/v1/agent/service/maintenance/web-1?enable={off}")
        assert ({}, ["web-1"]) == (double.checks(), list(double.services()))

    async def test_maintenance_makes_the_instance_critical(self, api: Api) -> None:
        """In maintenance the agent's health answer is 503 and ?passing drops it."""
        await api.registered(ttl_service(Status="passing"))
        await api.put("/v1/agent/service/maintenance/web-1?enable=true")
        health = await api.get("/v1/agent/health/service/id/web-1?format=text")
        passing = await api.get("/v1/health/service/web?passing")
        assert (503, []) == (health.status, passing.json())


# --- agent reads ---------------------------------------------------------------------------


class TestAgentReads:
    async def test_services_is_an_object_by_id_without_index(self, api: Api) -> None:
        """/v1/agent/services: {ID: service}; not a blocking endpoint, no X-Consul-Index."""
        await api.registered({"ID": "web-1", "Name": "web", "Port": 1})
        await api.registered({"ID": "web-2", "Name": "web", "Port": 2})
        answer = await api.get("/v1/agent/services")
        services = answer.json()
        assert ["web-1", "web-2"] == sorted(services)
        assert ("web-2", "web", 2) == (
            services["web-2"]["ID"],
            services["web-2"]["Service"],
            services["web-2"]["Port"],
        )
        assert "X-Consul-Index" not in answer.headers

    async def test_one_service_carries_its_content_hash(self, api: Api) -> None:
        """/v1/agent/service/<id>: the service plus ContentHash, also as a header."""
        await api.registered({"ID": "web-1", "Name": "web", "Port": 1})
        answer = await api.get("/v1/agent/service/web-1")
        body = answer.json()
        assert ("web-1", "web") == (body["ID"], body["Service"])
        assert body["ContentHash"] == answer.headers["X-Consul-ContentHash"]

    async def test_one_unknown_service_is_404(self, api: Api) -> None:
        """An unknown ID: 404 `unknown service ID: <id>`."""
        answer = await api.get("/v1/agent/service/nope")
        assert (404, "unknown service ID: nope") == (answer.status, answer.text)

    async def test_checks_is_an_object_by_check_id(self, api: Api) -> None:
        """/v1/agent/checks: {CheckID: check} of the agent's own checks."""
        await api.registered(ttl_service())
        checks = (await api.get("/v1/agent/checks")).json()
        assert ["service:web-1"] == list(checks)
        assert ("service:web-1", "critical", "web-1") == (
            checks["service:web-1"]["CheckID"],
            checks["service:web-1"]["Status"],
            checks["service:web-1"]["ServiceID"],
        )

    @pytest.mark.parametrize(
        ("status", "code"), [("passing", 200), ("warning", 429), ("critical", 503)]
    )
    async def test_health_by_id_maps_status_to_code(self, api: Api, status: str, code: int) -> None:
        """200 passing, 429 warning, 503 critical; JSON with AggregatedStatus."""
        await api.registered(ttl_service(Status=status))
        answer = await api.get("/v1/agent/health/service/id/web-1")
        body = answer.json()
        assert (code, status, "web-1") == (
            answer.status,
            body["AggregatedStatus"],
            body["Service"]["ID"],
        )

    @pytest.mark.parametrize(
        ("query", "headers"), [("?format=text", {}), ("", {"Accept": "text/plain"})]
    )
    async def test_health_as_text_is_the_bare_status(
        self, api: Api, query: str, headers: dict[str, str]
    ) -> None:
        """`?format=text` or `Accept: text/plain`: the status word alone."""
        await api.registered(ttl_service(Status="warning"))
        answer = await api.get(f"/v1/agent/health/service/id/web-1{query}", headers=headers)
        assert (429, "warning") == (answer.status, answer.text)

    async def test_health_by_name_is_the_worst_instance(self, api: Api) -> None:
        """By name: every instance, code of the worst one."""
        await api.registered(ttl_service("web-1", Status="passing"))
        await api.registered(ttl_service("web-2", Status="warning"))
        answer = await api.get("/v1/agent/health/service/name/web")
        statuses = sorted(item["AggregatedStatus"] for item in answer.json())
        assert (429, ["passing", "warning"]) == (answer.status, statuses)
        text = await api.get("/v1/agent/health/service/name/web?format=text")
        assert (429, "warning") == (text.status, text.text)

    @pytest.mark.parametrize(
        ("path", "reason", "body"),
        [
            (
                "id/nope",
                "ServiceId nope not found",
                {"AggregatedStatus": "critical", "Service": None, "Checks": None},
            ),
            ("name/nope", "ServiceName nope Not Found", []),
        ],
    )
    async def test_health_of_an_unknown_service_is_404(
        self, api: Api, path: str, reason: str, body: object
    ) -> None:
        """Unknown: 404, the reason as text when text is asked for, else a JSON body."""
        text = await api.get(f"/v1/agent/health/service/{path}?format=text")
        as_json = await api.get(f"/v1/agent/health/service/{path}")
        assert (404, reason) == (text.status, text.text)
        assert (404, body) == (as_json.status, as_json.json())


# --- /v1/health/service ------------------------------------------------------------------


class TestHealthService:
    async def test_an_array_of_node_service_checks(self, api: Api, double: ConsulDouble) -> None:
        """An array of {Node, Service, Checks}; checks include the node's serfHealth."""
        await api.registered(ttl_service(Status="passing"))
        answer = await api.get("/v1/health/service/web")
        [entry] = answer.json()
        assert ["Checks", "Node", "Service"] == sorted(entry)
        assert (double.node, "web-1") == (entry["Node"]["Node"], entry["Service"]["ID"])
        assert ["serfHealth", "service:web-1"] == sorted(c["CheckID"] for c in entry["Checks"])

    async def test_an_unknown_service_is_an_empty_array(self, api: Api) -> None:
        """Unknown service: 200 [] (never 404), still with an index >= 1."""
        answer = await api.get("/v1/health/service/nope")
        assert (200, []) == (answer.status, answer.json())
        assert answer.index >= 1

    async def test_an_empty_name_is_400(self, api: Api) -> None:
        """No service name: 400 `Missing service name`."""
        answer = await api.get("/v1/health/service/")
        assert (400, "Missing service name") == (answer.status, answer.text)

    @pytest.mark.parametrize("flag", ["?passing", "?passing=", "?passing=1", "?passing=t",
                                      "?passing=T", "?passing=TRUE", "?passing=true",
                                      "?passing=True"])  # fmt: skip
    async def test_passing_drops_instances_with_any_non_passing_check(
        self, api: Api, flag: str
    ) -> None:
        """`?passing` (bare or a Go true) drops an instance if any check is not passing."""
        await api.registered(ttl_service("web-1", Status="passing"))
        await api.registered(
            {
                "ID": "web-2",
                "Name": "web",
                "Checks": [
                    {"CheckID": "ok", "TTL": "10s", "Status": "passing"},
                    {"CheckID": "meh", "TTL": "10s", "Status": "warning"},
                ],
            }
        )
        answer = await api.get(f"/v1/health/service/web{flag}")
        assert ["web-1"] == [e["Service"]["ID"] for e in answer.json()]

    @pytest.mark.parametrize("flag", ["0", "f", "F", "FALSE", "false", "False"])
    async def test_passing_false_filters_nothing(self, api: Api, flag: str) -> None:
        """A Go false: every instance, healthy or not."""
        await api.registered(ttl_service("web-1", Status="passing"))
        await api.registered(ttl_service("web-2"))
        answer = await api.get(f"/v1/health/service/web?passing={flag}")
        assert ["web-1", "web-2"] == sorted(e["Service"]["ID"] for e in answer.json())

    async def test_passing_counts_node_checks(self, api: Api) -> None:
        """A critical node-level check (no ServiceID) drops that node's instances too."""
        node = {"Node": "n2", "Address": "10.0.0.2"}
        service = {"ID": "web-2", "Service": "web", "Port": 80}
        await api.put("/v1/catalog/register", {**node, "Service": service})
        await api.put(
            "/v1/catalog/register",
            {**node, "Check": {"CheckID": "disk", "Name": "disk", "Status": "critical"}},
        )
        await api.registered(ttl_service("web-1", Status="passing"))
        answer = await api.get("/v1/health/service/web?passing")
        assert ["web-1"] == [e["Service"]["ID"] for e in answer.json()]

    async def test_a_bad_passing_value_is_400(self, api: Api) -> None:
        """Not a Go bool: 400 `Invalid value for ?passing`."""
        answer = await api.get("/v1/health/service/web?passing=yes")
        assert (400, "Invalid value for ?passing") == (answer.status, answer.text)

    async def test_tags_must_all_match(self, api: Api) -> None:
        """`?tag=a&tag=b`: only instances carrying every tag."""
        await api.registered({"ID": "web-1", "Name": "web", "Tags": ["a"]})
        await api.registered({"ID": "web-2", "Name": "web", "Tags": ["a", "b", "c"]})
        answer = await api.get("/v1/health/service/web?tag=a&tag=b")
        assert ["web-2"] == [e["Service"]["ID"] for e in answer.json()]

    async def test_another_datacenter_is_500(self, api: Api) -> None:
        """`?dc=<unknown>`: 500 `No path to datacenter` (text unsure; the double's)."""
        answer = await api.get("/v1/health/service/web?dc=elsewhere")
        assert (500, "No path to datacenter") == (answer.status, answer.text)
        assert 200 == (await api.get("/v1/health/service/web?dc=dc1")).status

    async def test_stale_with_consistent_is_400(self, api: Api) -> None:
        """`?stale&consistent`: 400 with Consul's sentence; each alone is fine."""
        answer = await api.get("/v1/health/service/web?stale&consistent")
        expected = "Cannot specify ?stale with ?consistent, conflicting semantics."
        assert (400, expected) == (answer.status, answer.text)
        for flag in ("stale", "consistent", "leader", "near=_agent"):
            assert 200 == (await api.get(f"/v1/health/service/web?{flag}")).status

    async def test_filter_is_refused_not_ignored(self, api: Api) -> None:
        """The double has no bexpr: `?filter` fails loudly instead of filtering nothing."""
        answer = await api.get(
            "/v1/health/service/web?filter=" + quote('Service.Tags contains "a"')
        )
        assert 400 == answer.status


# --- blocking queries ----------------------------------------------------------------------


class TestBlocking:
    async def test_headers_on_every_read(self, api: Api) -> None:
        """X-Consul-Index (>= 1), X-Consul-KnownLeader and X-Consul-LastContact (ms)."""
        for path in ("/v1/health/service/web", "/v1/catalog/services", "/v1/catalog/service/web"):
            answer = await api.get(path)
            assert answer.index >= 1
            assert "true" == answer.headers["X-Consul-KnownLeader"]
            assert answer.headers["X-Consul-LastContact"].isdigit()

    async def test_returns_when_the_index_moves(self, api: Api) -> None:
        """?index=N blocks until the service changes, then answers with a higher index."""
        first = await api.get("/v1/health/service/web")
        task = await blocked(api, f"/v1/health/service/web?index={first.index}&wait=10s")
        await api.registered(ttl_service())
        answer = await asyncio.wait_for(task, 5)
        assert answer.index > first.index
        assert ["web-1"] == [e["Service"]["ID"] for e in answer.json()]

    async def test_other_services_do_not_wake_it(self, api: Api) -> None:
        """A change to another service leaves the query blocked."""
        first = await api.get("/v1/health/service/web")
        task = await blocked(api, f"/v1/health/service/web?index={first.index}&wait=10s")
        await api.registered(ttl_service("db-1", "db"))
        done, _ = await asyncio.wait({task}, timeout=0.2)
        assert set() == done
        await api.registered(ttl_service())
        assert (await asyncio.wait_for(task, 5)).index > first.index

    async def test_times_out_with_the_same_index_and_body(self, api: Api) -> None:
        """Nothing changes within `wait`: 200 with the same index and body."""
        await api.registered(ttl_service())
        first = await api.get("/v1/health/service/web")
        started = time.monotonic()
        answer = await api.get(f"/v1/health/service/web?index={first.index}&wait=300ms")
        assert time.monotonic() - started >= 0.3
        assert (200, first.index, first.json()) == (answer.status, answer.index, answer.json())

    @pytest.mark.parametrize("wait", ["soon", "10", "-", "1x"])
    async def test_a_bad_wait_is_400(self, api: Api, wait: str) -> None:
        """`wait` that Go cannot parse: 400 `Invalid wait time`."""
        answer = await api.get(f"/v1/health/service/web?index=1&wait={wait}")
        assert (400, "Invalid wait time") == (answer.status, answer.text)

    @pytest.mark.parametrize("index", ["abc", "-1", "1.5", "18446744073709551616"])
    async def test_a_bad_index_is_400(self, api: Api, index: str) -> None:
        """`index` that is not a uint64: 400 `Invalid index`."""
        answer = await api.get(f"/v1/health/service/web?index={index}")
        assert (400, "Invalid index") == (answer.status, answer.text)

    async def test_without_index_wait_is_ignored(self, api: Api) -> None:
        """No index (or an empty one): answered at once, whatever `wait` says."""
        async with asyncio.timeout(5):
            plain = await api.get("/v1/health/service/web?wait=10m")
            empty = await api.get("/v1/health/service/web?index=&wait=10m")
            zero = await api.get("/v1/health/service/web?index=0&wait=10m")
        assert [200, 200, 200] == [plain.status, empty.status, zero.status]

    async def test_a_spurious_wakeup_has_a_higher_index_and_the_same_body(
        self, api: Api, double: ConsulDouble
    ) -> None:
        """spurious_wakeup: the query returns with a higher index and an unchanged body."""
        await api.registered(ttl_service())
        first = await api.get("/v1/health/service/web")
        task = await blocked(api, f"/v1/health/service/web?index={first.index}&wait=10s")
        double.spurious_wakeup("web")
        answer = await asyncio.wait_for(task, 5)
        assert answer.index > first.index
        assert first.json() == answer.json()

    async def test_an_index_going_backwards_wakes_blocked_queries(
        self, api: Api, double: ConsulDouble
    ) -> None:
        """set_index_backwards: blocked queries return at once with the lower index."""
        await api.registered(ttl_service())
        first = await api.get("/v1/health/service/web")
        assert first.index > 3
        task = await blocked(api, f"/v1/health/service/web?index={first.index}&wait=10s")
        double.set_index_backwards(to=3)
        answer = await asyncio.wait_for(task, 5)
        assert 3 == answer.index

    async def test_index_zero_from_a_buggy_server(self, api: Api, double: ConsulDouble) -> None:
        """set_index_zero: blocked queries wake and every answer says 0, until it is off."""
        first = await api.get("/v1/health/service/web")
        task = await blocked(api, f"/v1/health/service/web?index={first.index}&wait=10s")
        double.set_index_zero()
        assert 0 == (await asyncio.wait_for(task, 5)).index
        assert 0 == (await api.get("/v1/catalog/services")).index
        double.set_index_zero(False)
        assert (await api.get("/v1/health/service/web")).index >= 1

    async def test_catalog_services_blocks_on_any_change(self, api: Api) -> None:
        """/v1/catalog/services blocks on the catalog's index."""
        first = await api.get("/v1/catalog/services")
        task = await blocked(api, f"/v1/catalog/services?index={first.index}&wait=10s")
        await api.registered(ttl_service("db-1", "db"))
        answer = await asyncio.wait_for(task, 5)
        assert answer.index > first.index
        assert "db" in answer.json()


# --- catalog -------------------------------------------------------------------------------


class TestCatalog:
    async def test_register_answers_true_and_is_visible(self, api: Api) -> None:
        """Node + service + check: 200 `true`; the instance is in catalog and health reads."""
        answer = await api.put(
            "/v1/catalog/register",
            {
                "Node": "n2",
                "Address": "10.0.0.2",
                "Service": {"ID": "web-2", "Service": "web", "Port": 80, "Tags": ["v1"]},
                "Check": {"CheckID": "c", "Name": "c", "ServiceID": "web-2", "Status": "passing"},
            },
        )
        assert (200, True) == (answer.status, answer.json())
        [flat] = (await api.get("/v1/catalog/service/web")).json()
        expected = ("n2", "10.0.0.2", "web-2", "web", 80, ["v1"])
        assert expected == (
            flat["Node"],
            flat["Address"],
            flat["ServiceID"],
            flat["ServiceName"],
            flat["ServicePort"],
            flat["ServiceTags"],
        )
        [entry] = (await api.get("/v1/health/service/web?passing")).json()
        assert "web-2" == entry["Service"]["ID"]

    async def test_register_is_an_upsert(self, api: Api) -> None:
        """The same service ID again replaces the old one and keeps its CreateIndex."""
        body = {"Node": "n2", "Address": "10.0.0.2", "Service": {"ID": "web-2", "Service": "web"}}
        await api.put(
            "/v1/catalog/register", body | {"Service": {"ID": "web-2", "Service": "web", "Port": 1}}
        )
        [before] = (await api.get("/v1/catalog/service/web")).json()
        await api.put(
            "/v1/catalog/register", body | {"Service": {"ID": "web-2", "Service": "web", "Port": 2}}
        )
        [after] = (await api.get("/v1/catalog/service/web")).json()
        assert (2, before["CreateIndex"]) == (after["ServicePort"], after["CreateIndex"])

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ({"Address": "10.0.0.2"}, "Must provide node"),
            ({"Node": "n2"}, "Must provide address if SkipNodeUpdate is not set"),
        ],
    )
    async def test_register_requires_node_and_address(
        self, api: Api, body: Json, message: str
    ) -> None:
        """Catalog.Register's own checks come back over RPC: 500 with its message."""
        answer = await api.put("/v1/catalog/register", body)
        assert (500, message) == (answer.status, answer.text)

    async def test_skip_node_update_needs_no_address(self, api: Api, double: ConsulDouble) -> None:
        """With SkipNodeUpdate the address may be left out and the node's is kept."""
        await api.put("/v1/catalog/register", {"Node": "n2", "Address": "10.0.0.2"})
        answer = await api.put(
            "/v1/catalog/register",
            {"Node": "n2", "SkipNodeUpdate": True, "Service": {"Service": "web"}},
        )
        assert 200 == answer.status
        assert ("10.0.0.2", ["web"]) == (
            double.nodes()["n2"]["Address"],
            double.nodes()["n2"]["Services"],
        )

    async def test_deregister_service_check_and_node(self, api: Api, double: ConsulDouble) -> None:
        """Deregister by ServiceID (with its checks), by CheckID, or the whole node."""
        node = {"Node": "n2", "Address": "10.0.0.2"}
        await api.put("/v1/catalog/register", node | {"Service": {"ID": "a", "Service": "web"}})
        await api.put("/v1/catalog/register", node | {"Service": {"ID": "b", "Service": "web"}})
        await api.put(
            "/v1/catalog/register",
            node | {"Checks": [{"CheckID": "ca", "ServiceID": "a"}, {"CheckID": "node-check"}]},
        )
        gone_service = await api.put("/v1/catalog/deregister", {"Node": "n2", "ServiceID": "a"})
        assert (["b"], ["node-check"]) == (
            double.nodes()["n2"]["Services"],
            double.nodes()["n2"]["Checks"],
        )
        gone_check = await api.put(
            "/v1/catalog/deregister", {"Node": "n2", "CheckID": "node-check"}
        )
        assert [] == double.nodes()["n2"]["Checks"]
        gone_node = await api.put("/v1/catalog/deregister", {"Node": "n2"})
        assert "n2" not in double.nodes()
        assert [True] * 3 == [a.json() for a in (gone_service, gone_check, gone_node)]

    async def test_deregister_of_an_unknown_node_is_a_no_op(self, api: Api) -> None:
        """Nothing there: 200 `true`."""
        answer = await api.put("/v1/catalog/deregister", {"Node": "ghost"})
        assert (200, True) == (answer.status, answer.json())

    async def test_deregister_requires_a_node(self, api: Api) -> None:
        """No Node: Catalog.Deregister's 500 `Must provide node`."""
        answer = await api.put("/v1/catalog/deregister", {"ServiceID": "a"})
        assert (500, "Must provide node") == (answer.status, answer.text)

    async def test_catalog_service_filters_by_every_tag(self, api: Api) -> None:
        """catalog/service/<name>?tag=...: all tags must match; empty name is 400."""
        await api.registered({"ID": "web-1", "Name": "web", "Tags": ["a"]})
        await api.registered({"ID": "web-2", "Name": "web", "Tags": ["a", "b"]})
        answer = await api.get("/v1/catalog/service/web?tag=a&tag=b")
        assert ["web-2"] == [e["ServiceID"] for e in answer.json()]
        empty = await api.get("/v1/catalog/service/")
        assert (400, "Missing service name") == (empty.status, empty.text)

    async def test_catalog_services_maps_names_to_tags(self, api: Api) -> None:
        """catalog/services: {name: [tags]}, with Consul's own `consul` entry."""
        await api.registered({"ID": "web-1", "Name": "web", "Tags": ["b"]})
        await api.registered({"ID": "web-2", "Name": "web", "Tags": ["a", "b"]})
        assert {"consul": [], "web": ["a", "b"]} == (await api.get("/v1/catalog/services")).json()


# --- ACL -----------------------------------------------------------------------------------


class TestAcl:
    @pytest.mark.parametrize(
        ("query", "headers"),
        [
            ("?token=writer", {}),
            ("", {"X-Consul-Token": "writer"}),
            ("", {"Authorization": "Bearer writer"}),
            ("", {"Authorization": "Bearer  writer extra words"}),
        ],
    )
    async def test_the_token_is_read_from_query_header_or_bearer(
        self, acl_api: Api, query: str, headers: dict[str, str]
    ) -> None:
        """?token, X-Consul-Token, or `Authorization: Bearer <first word>`."""
        answer = await acl_api.register({"Name": "web"}, query, headers=headers)
        assert (200, "") == (answer.status, answer.text)

    async def test_query_token_comes_first_then_x_consul_token(self, acl_api: Api) -> None:
        """?token wins over X-Consul-Token, which wins over Authorization."""
        wins = await acl_api.register(
            {"Name": "web"}, "?token=writer", headers={"X-Consul-Token": "bogus"}
        )
        loses = await acl_api.register(
            {"Name": "web"}, "?token=bogus", headers={"X-Consul-Token": "writer"}
        )
        header = await acl_api.register(
            {"Name": "web"},
            headers={"X-Consul-Token": "writer", "Authorization": "Bearer bogus"},
        )
        assert [200, 403, 200] == [wins.status, loses.status, header.status]

    async def test_an_unknown_token_is_403_acl_not_found(self, acl_api: Api) -> None:
        """An unknown token: 403 `ACL not found`, on writes and on reads."""
        write = await acl_api.register({"Name": "web"}, headers={"X-Consul-Token": "bogus"})
        read = await acl_api.get("/v1/health/service/web", headers={"X-Consul-Token": "bogus"})
        assert [(403, "ACL not found")] * 2 == [(a.status, a.text) for a in (write, read)]

    async def test_lacking_permission_is_403_naming_it(self, acl_api: Api) -> None:
        """A token without service:write: 403 naming its AccessorID, permission and service."""
        answer = await acl_api.register({"Name": "web"}, headers={"X-Consul-Token": "reader"})
        expected = (
            f"Permission denied: token with AccessorID '{READER}' lacks permission "
            "'service:write' on \"web\""
        )
        assert (403, expected) == (answer.status, answer.text)
        assert TEXT_PLAIN == answer.headers["Content-Type"]

    async def test_no_token_is_anonymous(self, acl_api: Api) -> None:
        """No token under default deny: the anonymous token's 403."""
        answer = await acl_api.register({"Name": "web"})
        expected = "Permission denied: anonymous token lacks permission 'service:write' on \"web\""
        assert (403, expected) == (answer.status, answer.text)

    async def test_writes_to_checks_and_deregister_need_service_write(self, acl_api: Api) -> None:
        """check pass and deregister check service:write on the owning service."""
        writer = {"X-Consul-Token": "writer"}
        reader = {"X-Consul-Token": "reader"}
        await acl_api.register(ttl_service(), headers=writer)
        denied = [
            await acl_api.put("/v1/agent/check/pass/service:web-1", headers=reader),
            await acl_api.put("/v1/agent/service/deregister/web-1", headers=reader),
            await acl_api.put("/v1/agent/service/maintenance/web-1?enable=1", headers=reader),
        ]
        assert [403, 403, 403] == [a.status for a in denied]
        assert (
            200 == (await acl_api.put("/v1/agent/check/pass/service:web-1", headers=writer)).status
        )

    async def test_reads_are_filtered(self, acl_api: Api) -> None:
        """A token that may not read a service gets 200 without it, not a 403."""
        await acl_api.register(ttl_service(), headers={"X-Consul-Token": "writer"})
        paths = ["/v1/health/service/web", "/v1/catalog/service/web"]
        for path in paths:
            seen = await acl_api.get(path, headers={"X-Consul-Token": "reader"})
            hidden = await acl_api.get(path, headers={"X-Consul-Token": "blind"})
            assert (200, 1, 200, []) == (
                seen.status,
                len(seen.json()),
                hidden.status,
                hidden.json(),
            )
        names = await acl_api.get("/v1/catalog/services", headers={"X-Consul-Token": "blind"})
        assert {"consul": []} == names.json()

    async def test_the_default_policy_header_says_deny(self, acl_api: Api) -> None:
        """`X-Consul-Default-Acl-Policy: deny` when the double runs with deny."""
        answer = await acl_api.get("/v1/agent/services")
        assert "deny" == answer.headers["X-Consul-Default-Acl-Policy"]


# --- test controls -------------------------------------------------------------------------


class TestControls:
    async def test_go_down_refuses_connections_and_come_up_keeps_state(
        self, api: Api, double: ConsulDouble
    ) -> None:
        """go_down: connections refused; come_up: same port, same services."""
        await api.registered(ttl_service())
        port = double.port
        await double.go_down()
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.get("/v1/agent/services")
        await double.come_up()
        assert port == double.port
        assert ["web-1"] == list((await api.get("/v1/agent/services")).json())

    async def test_go_down_ends_blocked_queries(self, api: Api, double: ConsulDouble) -> None:
        """A query blocked when Consul goes down fails at once, and stop() does not wait."""
        first = await api.get("/v1/health/service/web")
        task = await blocked(api, f"/v1/health/service/web?index={first.index}&wait=30s")
        await double.go_down()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert {task} == done
        assert isinstance(task.exception(), aiohttp.ClientError)
        async with asyncio.timeout(5):
            await double.stop()

    async def test_restart_agent_loses_the_agents_state(
        self, api: Api, double: ConsulDouble
    ) -> None:
        """restart_agent: agent services and checks are gone; catalog nodes stay."""
        await api.registered(ttl_service())
        double.register_instance("web", id="web-9", address="10.0.0.9", port=80)
        double.restart_agent()
        assert ({}, {}) == (double.services(), double.checks())
        entries = (await api.get("/v1/health/service/web")).json()
        assert ["web-9"] == [e["Service"]["ID"] for e in entries]

    async def test_fail_with_answers_everything_with_that_error(
        self, api: Api, double: ConsulDouble
    ) -> None:
        """fail_with=(429, text): every request gets it, as plain text, until cleared."""
        double.fail_with = (429, "Too Many Requests")
        answer = await api.get("/v1/health/service/web")
        assert (429, "Too Many Requests", TEXT_PLAIN) == (
            answer.status,
            answer.text,
            answer.headers["Content-Type"],
        )
        assert 429 == (await api.register({"Name": "web"})).status
        double.fail_with = None
        assert 200 == (await api.get("/v1/health/service/web")).status

    async def test_slow_delays_every_answer(self, api: Api, double: ConsulDouble) -> None:
        """slow=0.3: an answer takes at least that long."""
        double.slow = 0.3
        started = time.monotonic()
        answer = await api.get("/v1/agent/services")
        assert 200 == answer.status
        assert time.monotonic() - started >= 0.3

    async def test_requests_are_recorded(self, api: Api, double: ConsulDouble) -> None:
        """Every request is kept: method, path, query and body."""
        await api.register({"Name": "web"}, "?replace-existing-checks")
        [request] = double.requests
        assert ("PUT", "/v1/agent/service/register", [("replace-existing-checks", "")]) == (
            request.method,
            request.path,
            request.query,
        )
        assert {"Name": "web"} == json.loads(request.body)


# --- through python-consul2 --------------------------------------------------------------


class _AioHttpClient(consul.base.HTTPClient):  # type: ignore[misc]
    """python-consul2's HTTP seam over an aiohttp session (its own aio client leaks them)."""

    def __init__(self, session: aiohttp.ClientSession, base_uri: str) -> None:
        super().__init__()
        self.base_uri = base_uri
        self._session = session

    async def _call(
        self, callback: Any, method: str, path: str, *, params: Any, data: str | None, headers: Any
    ) -> Any:
        async with self._session.request(
            method, self.uri(path, params), data=data or None, headers=headers
        ) as response:
            content = await response.read()
        return callback(
            consul.base.Response(response.status, response.headers, content.decode(), content)
        )

    async def get(self, callback: Any, path: str, params: Any = None, headers: Any = None) -> Any:
        return await self._call(callback, "GET", path, params=params, data=None, headers=headers)

    async def put(
        self, callback: Any, path: str, params: Any = None, data: str = "", headers: Any = None
    ) -> Any:
        return await self._call(callback, "PUT", path, params=params, data=data, headers=headers)

    async def delete(
        self, callback: Any, path: str, params: Any = None, data: str = "", headers: Any = None
    ) -> Any:
        return await self._call(callback, "DELETE", path, params=params, data=data, headers=headers)

    async def post(
        self, callback: Any, path: str, params: Any = None, data: str = "", headers: Any = None
    ) -> Any:
        return await self._call(callback, "POST", path, params=params, data=data, headers=headers)


class _PyConsul(consul.base.Consul):  # type: ignore[misc]
    """python-consul2's endpoint groups, without its constructor (it reads CONSUL_* env)."""

    def __init__(self, http: _AioHttpClient) -> None:
        self.http = http
        self.token = None
        self.dc = None
        self.scheme = "http"
        self.consistency = "default"
        self.agent = consul.base.Consul.Agent(self)
        self.health = consul.base.Consul.Health(self)


@pytest.fixture
def py_consul(session: aiohttp.ClientSession, double: ConsulDouble) -> Any:
    return _PyConsul(_AioHttpClient(session, double.address))


class TestPythonConsul2:
    async def test_register_and_health_with_its_lowercase_json(
        self, py_consul: Any, double: ConsulDouble
    ) -> None:
        """python-consul2's lowercase keys and text/plain body register; health has an index."""
        registered = await py_consul.agent.service.register(
            "web", service_id="web-1", port=8080, check=consul.base.Check.ttl("10s")
        )
        assert True is registered
        assert 10.0 == double.checks()["service:web-1"]["TTL"]
        index, nodes = await py_consul.health.service("web")
        assert int(index) >= 1
        assert ["web-1"] == [n["Service"]["ID"] for n in nodes]

    async def test_ttl_pass_and_a_blocking_health_query(
        self, py_consul: Any, double: ConsulDouble
    ) -> None:
        """ttl_pass sets the check; a blocking ?passing query sees it with a higher index."""
        await py_consul.agent.service.register(
            "web", service_id="web-1", check=consul.base.Check.ttl("10s")
        )
        index, nodes = await py_consul.health.service("web", passing=True)
        assert [] == nodes
        waiting = asyncio.get_running_loop().create_task(
            py_consul.health.service("web", passing=True, index=index, wait="10s")
        )
        await py_consul.agent.check.ttl_pass("service:web-1", notes="fine")
        new_index, nodes = await asyncio.wait_for(waiting, 5)
        assert int(new_index) > int(index)
        assert ["fine"] == [c["Output"] for c in nodes[0]["Checks"] if c["CheckID"] != "serfHealth"]

    async def test_consuls_text_reaches_the_exception(self, py_consul: Any) -> None:
        """A 400's plain-text body is what python-consul2 puts in its exception."""
        with pytest.raises(consul.base.BadRequest, match=r"^400 Invalid service address$"):
            await py_consul.agent.service.register("web", address="0.0.0.0")
