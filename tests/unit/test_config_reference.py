"""docs/configuration.md held to the config loader, so the reference cannot drift.

The keys the sidecar accepts are read off the loader itself, not the dataclasses (some
fields are derived, renamed or set from the environment only): `_Section`'s readers are
wrapped while a config that reaches every section loads, and each key path they are
asked for is recorded. The document's key tables and environment table are then
compared with that record, both ways, and every default the document states as a
literal is fed back through the loader and must change nothing.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from sidecar import config as config_module
from sidecar.config import (
    ALERT_KINDS,
    ENV_VARS,
    AppConnectionsConfig,
    BreakerConfig,
    DiscoveryConfig,
    HealthConfig,
    OutlierConfig,
    RetryConfig,
    ShutdownConfig,
    config_from_mapping,
    parse_duration,
    parse_size,
)
from sidecar.errors import ConfigError

CONFIG_DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

KEY_HEADER = "| key | type | default | validation | env |"
ENV_HEADER = "| variable | sets | notes |"
_ENV_NAME = re.compile(r"`([A-Z][A-Z0-9_]+)`")
_ONE_CODE = re.compile(r"`([^`]+)`")
_LEADING_LITERAL = re.compile(r"`([^`]*)`")

#: Sections read with `_Section.take`, whose defaults are the dataclass's own.
TAKEN_SECTIONS: dict[str, type] = {
    "service.health": HealthConfig,
    "discovery": DiscoveryConfig,
    "shutdown": ShutdownConfig,
    "app_connections": AppConnectionsConfig,
    "upstreams.<name>.circuit_breaker": BreakerConfig,
    "upstreams.<name>.retries": RetryConfig,
    "upstreams.<name>.outlier": OutlierConfig,
}

#: Enough to make the loader read every key it knows: an upstream with a fallback, a
#: subscription, and an alert rule of every kind (which keys a rule reads depends on
#: its kind). It need not be valid.
PROBE_CONFIG: dict[str, Any] = {
    "service": {"name": "probe", "port": 8080},
    "upstreams": {"billing": {"fallback": {"status": 200}}},
    "events": {"subscriptions": [{"name": "orders", "topic": "orders.*", "path": "/events"}]},
    "alerts": {"rules": [{"name": kind, "kind": kind} for kind in ALERT_KINDS]},
}

#: A valid config with every section present, against which documented defaults are
#: tried: the key absent and the key set to its documented default must load the same.
BASE_CONFIG: dict[str, Any] = {
    "service": {"name": "permits", "port": 8080},
    "upstreams": {"billing": {"fallback": {"status": 503}}},
    "events": {  # not empty without its subscriptions: `events: {}` means no relay
        "exchange": "events",
        "subscriptions": [{"name": "orders", "topic": "orders.*", "path": "/events"}],
    },
    "alerts": {
        "rules": [
            {"name": "errors", "kind": "error_rate", "upstream": "billing", "threshold": 0.5},
            {"name": "slow", "kind": "latency_p99", "upstream": "billing", "threshold": "1s"},
            {"name": "open", "kind": "circuit_open", "upstream": "billing"},
            {"name": "backlog", "kind": "spool_depth", "threshold": 10},
            {"name": "consul", "kind": "consul_unreachable"},
            {"name": "broker", "kind": "broker_unreachable"},
        ]
    },
}

#: Keys the full example may leave out: they need a readable file, or exclude another key.
NOT_IN_FULL_EXAMPLE = {
    "consul.token_file",
    "consul.ca_file",
    "events.amqp_url_file",
    "upstreams.<name>.fallback.text",
}


# --- what the loader reads ------------------------------------------------------------------


@dataclass(frozen=True)
class LoaderKeys:
    """The key paths the loader reads, with `upstreams.<name>` and `[]` for list items."""

    leaves: frozenset[str]  # keys holding a value, and lists of sections (`x.rules[]`)
    sections: frozenset[str]  # mappings of further keys (list items included)
    rejected: frozenset[str]  # read only to be refused (`consul.token`)
    required: frozenset[str]  # read with `require` (for some alert kinds only, at times)
    defaults: Mapping[str, object]  # the default `get` was given (`_UNSET` under `take`)
    env: Mapping[str, str]  # env var → the key whose `get` reads it

    @property
    def known(self) -> frozenset[str]:
        return self.leaves | self.sections | self.rejected


def normalise(path: str) -> str:
    """`upstreams.billing.retries[0]` → `upstreams.<name>.retries[]`."""
    path = re.sub(r"\[\d+\]", "[]", path)
    return re.sub(r"^upstreams\.[^.\[]+", "upstreams.<name>", path)


_UNSET = config_module._UNSET


@functools.cache
def loader_keys() -> LoaderKeys:
    """Load PROBE_CONFIG with `_Section`'s readers wrapped, recording each key they read."""
    section_cls = config_module._Section
    calls: dict[str, set[str]] = {}
    defaults: dict[str, object] = {}
    env: dict[str, str] = {}
    made: set[str] = set()

    def wrapped(name: str) -> Callable[..., Any]:
        original = getattr(section_cls, name)

        def reader(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
            path = normalise(self.at(key))
            calls.setdefault(path, set()).add(name)
            if name == "get":
                defaults.setdefault(path, args[1] if len(args) > 1 else kwargs.get("default"))
                if kwargs.get("env"):
                    env[kwargs["env"]] = path
            return original(self, key, *args, **kwargs)

        return reader

    original_init = section_cls.__init__

    def init(self: Any, data: object, path: str, ctx: Any) -> None:
        if path:
            made.add(normalise(path))
        original_init(self, data, path, ctx)

    with contextlib.ExitStack() as stack:
        for name in ("get", "require", "items", "mapping", "section", "reject"):
            stack.enter_context(mock.patch.object(section_cls, name, wrapped(name)))
        stack.enter_context(mock.patch.object(section_cls, "__init__", init))
        with contextlib.suppress(ConfigError):
            config_from_mapping(PROBE_CONFIG, {})

    def read_with(*names: str) -> set[str]:
        return {path for path, how in calls.items() if how & set(names)}

    lists = {path for path in made if path.endswith("[]")}
    leaves = read_with("get", "require", "items", "mapping") | lists
    sections = (read_with("section") | made) - read_with("mapping")
    return LoaderKeys(
        leaves=frozenset(leaves),
        sections=frozenset(sections),
        rejected=frozenset(read_with("reject") - leaves),
        required=frozenset(read_with("require")),
        defaults={path: value for path, value in defaults.items() if path in leaves},
        env=env,
    )


# --- what the document says -----------------------------------------------------------------


@dataclass(frozen=True)
class KeyRow:
    """One row of a key table in docs/configuration.md."""

    key: str
    type: str
    default: str
    validation: str
    env: frozenset[str]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _doc_section(heading: str) -> list[str]:
    """The lines of the `## heading` section of docs/configuration.md."""
    lines = CONFIG_DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line == f"## {heading}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), None)
    return lines[start + 1 : end]


def _tables(lines: list[str], header: str) -> Iterator[list[str]]:
    """The body rows of every table in `lines` whose header is `header`; AssertionError for
    a table row outside such a table (a row under a paragraph renders as text)."""
    rows: list[str] | None = None
    for line in lines:
        if not line.startswith("|"):
            if rows is not None:
                yield rows
            rows = None
        elif rows is not None:
            rows.append(line)
        elif line == header:
            rows = []
        else:
            raise AssertionError(f"configuration.md: a row outside a table of its kind: {line}")
    if rows is not None:
        yield rows


def key_rows() -> dict[str, KeyRow]:
    """The rows of the key tables under `## Keys`, by key path."""
    rows: dict[str, KeyRow] = {}
    for table in _tables(_doc_section("Keys"), KEY_HEADER):
        for line in table[1:]:  # [0] is the |---| line
            cells = _cells(line)
            assert len(cells) == 5, f"configuration.md: not 5 cells: {line}"
            match = re.fullmatch(r"`([^`]+)`", cells[0])
            assert match, f"configuration.md: the key cell must be one `path`: {line}"
            key = match[1]
            assert key not in rows, f"configuration.md: {key} has two rows"
            env = frozenset(_ENV_NAME.findall(cells[4]))
            rows[key] = KeyRow(key, cells[1], cells[2], cells[3], env)
    return rows


def env_rows() -> dict[str, str]:
    """The environment table: variable → its `sets` cell."""
    rows: dict[str, str] = {}
    for table in _tables(_doc_section("Environment variables"), ENV_HEADER):
        for line in table[1:]:
            cells = _cells(line)
            match = re.fullmatch(r"`([A-Z][A-Z0-9_]+)`", cells[0])
            assert match, f"configuration.md: one variable per row, in full: {line}"
            assert match[1] not in rows, f"configuration.md: {match[1]} has two rows"
            rows[match[1]] = cells[1]
    return rows


def full_example() -> dict[str, Any]:
    lines = _doc_section("Full example (every key this build accepts)")
    start = lines.index("```yaml")
    end = lines.index("```", start + 1)
    data = yaml.load("\n".join(lines[start + 1 : end]), Loader=config_module._Loader)
    assert isinstance(data, dict)
    return data


def _example_keys(value: object, path: str, keys: LoaderKeys, found: set[str]) -> None:
    """Record in `found` every key path written in `value`, read at section `path`."""
    if not isinstance(value, dict):
        return
    for key, child in value.items():
        child_path = normalise(f"{path}.{key}" if path else str(key))
        if f"{child_path}[]" in keys.leaves and isinstance(child, list):
            found.add(f"{child_path}[]")
            for item in child:
                _example_keys(item, f"{child_path}[]", keys, found)
            continue
        found.add(child_path)
        if child_path in keys.sections:
            _example_keys(child, child_path, keys, found)


# --- defaults, fed back through the loader ----------------------------------------------------


def _literal(cell: str) -> tuple[bool, object]:
    """(True, value) when the default cell starts with a literal the loader can be given."""
    match = _LEADING_LITERAL.match(cell)
    if match is None or re.search(r"[<>$()]", match[1]):
        return False, None
    try:
        return True, yaml.load(match[1], Loader=config_module._Loader)
    except yaml.YAMLError:
        return False, None


def _steps(key: str) -> list[str]:
    """`upstreams.<name>.retries.max` → ["upstreams", "billing", "retries", "max"]; a list
    of sections is one step ending in `[]`."""
    key = key.replace("upstreams.<name>", "upstreams.billing", 1)
    return re.findall(r"[^.\[\]]+(?:\[\])?", key)


def _variants(key: str, value: object) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(BASE_CONFIG without `key`, BASE_CONFIG with `key: value`); one pair per list item
    for a key inside a list of sections."""

    def place(data: dict[str, Any], steps: list[str]) -> Iterator[dict[str, Any]]:
        step, rest = steps[0], steps[1:]
        if not rest:
            yield data
            return
        if step.endswith("[]"):
            for item in data.get(step[:-2], []):
                yield from place(item, rest)
            return
        yield from place(data.setdefault(step, {}), rest)

    steps = _steps(key)
    last = steps[-1].removesuffix("[]")
    count = len(list(place(copy.deepcopy(BASE_CONFIG), steps)))
    for index in range(count):
        without, with_ = copy.deepcopy(BASE_CONFIG), copy.deepcopy(BASE_CONFIG)
        list(place(without, steps))[index].pop(last, None)
        list(place(with_, steps))[index][last] = value
        yield without, with_


def _model_default_is_none(key: str, keys: LoaderKeys) -> bool:
    if key not in keys.defaults:  # items() and mapping(): absent is empty
        return True
    default = keys.defaults[key]
    if default is _UNSET:
        section, _, name = key.rpartition(".")
        assert section in TAKEN_SECTIONS, f"add {section}'s dataclass to TAKEN_SECTIONS"
        [field] = [f for f in fields(TAKEN_SECTIONS[section]) if f.name == name]
        default = None if field.default is MISSING else field.default
    return default is None


# --- the tests --------------------------------------------------------------------------------


class TestLoaderRecord:
    def test_the_probe_reaches_every_section(self) -> None:
        """The recording sees the keys of upstreams, fallbacks, subscriptions and every
        alert kind (a sanity check of the test's own probe)."""
        keys = loader_keys()
        for path in (
            "upstreams.<name>.fallback.status",
            "events.subscriptions[].backoff.max",
            "alerts.rules[].threshold",
            "alerts.rules[].window",
            "telemetry.tracing.schedule_delay",
        ):
            assert path in keys.leaves
        assert {"consul.token"} == set(keys.rejected)


class TestKeyTables:
    def test_every_key_the_loader_reads_is_documented(self) -> None:
        """Each key path the loader accepts has a row in a key table."""
        missing = loader_keys().leaves - set(key_rows())
        assert set() == missing

    def test_every_documented_key_is_read_by_the_loader(self) -> None:
        """No row names a key the loader would report as unknown."""
        unknown = set(key_rows()) - loader_keys().known
        assert set() == unknown

    def test_a_refused_key_is_documented_as_rejected(self) -> None:
        """A key the loader reads only to refuse it (a secret) says so in its row."""
        rows = key_rows()
        for key in loader_keys().rejected:
            assert "rejected" in rows[key].validation, key

    def test_required_keys_are_documented_as_required(self) -> None:
        """The default cell says **required** exactly for the keys read with `require`."""
        required = {key for key, row in key_rows().items() if "**required**" in row.default}
        assert set(loader_keys().required) == required

    def test_documented_defaults_are_the_loaders(self) -> None:
        """A default stated as a literal (`10s`, `512MiB`, `true`, `[]`, a URL) loads to the
        same config as leaving the key out; one stated as "none" is the model's None."""
        keys = loader_keys()
        checked, wrong = 0, []
        for key, row in key_rows().items():
            if key not in keys.leaves or "**required**" in row.default:
                continue
            if re.match(r"none\b", row.default) or row.default.startswith("—"):
                if not _model_default_is_none(key, keys):
                    wrong.append(f"{key}: documented none, the model has a default")
                continue
            ok, value = _literal(row.default)
            if not ok:
                continue  # a computed default, described in words
            if row.type == "duration":
                parse_duration(value)
            elif row.type == "size":
                parse_size(value)
            compared = 0
            for without, with_ in _variants(key, value):
                try:
                    set_to_default = config_from_mapping(with_, {})
                except ConfigError:
                    continue  # a list item of a kind that refuses this key
                compared += 1
                if config_from_mapping(without, {}) != set_to_default:
                    wrong.append(f"{key}: the documented default {row.default} is not the model's")
            if compared == 0:
                wrong.append(f"{key}: the documented default {row.default} does not load")
            checked += 1
        assert [] == wrong
        assert checked >= 60  # most defaults are literals: the parsing above found them

    def test_base_config_loads(self) -> None:
        """The config the defaults are tried against is itself valid."""
        config_from_mapping(BASE_CONFIG, {})


class TestEnvironment:
    def test_the_env_table_lists_exactly_env_vars(self) -> None:
        """Every variable in `ENV_VARS` has one row, and no other variable has one."""
        assert sorted(v.name for v in ENV_VARS) == sorted(env_rows())

    def test_each_variable_sets_the_key_env_vars_names(self) -> None:
        """The `sets` cell names the variable's `ENV_VARS` path (— for none)."""
        rows = env_rows()
        wrong = []
        for var in ENV_VARS:
            cell = rows[var.name]
            if var.path == "-":
                ok = cell.startswith("—")
            else:
                first = _ONE_CODE.match(cell)
                ok = first is not None and first[1] == var.path
            if not ok:
                wrong.append(f"{var.name}: documented as setting {cell!r}, sets {var.path!r}")
        assert [] == wrong

    def test_env_var_paths_are_keys(self) -> None:
        """Each `ENV_VARS` path is a key or section the loader knows (or none)."""
        keys = loader_keys()
        unknown = {v.path for v in ENV_VARS if v.path != "-" and v.path not in keys.known}
        assert set() == unknown

    def test_key_rows_name_their_env_vars(self) -> None:
        """A key row's env column names exactly the variables that set that key: those the
        loader reads for the key, else those `ENV_VARS` maps to it."""
        keys, rows = loader_keys(), key_rows()
        expected: dict[str, set[str]] = {key: set() for key in rows}
        for var in ENV_VARS:
            key = keys.env.get(var.name, var.path)
            if key in expected:
                expected[key].add(var.name)
        documented = {key: set(row.env) for key, row in rows.items()}
        assert expected == documented


class TestFullExample:
    def test_it_loads(self) -> None:
        """The full example is a valid config."""
        config_from_mapping(full_example(), {})

    def test_it_shows_every_key(self) -> None:
        """It writes every key, but those needing a file or excluding another, and only
        documented keys."""
        keys = loader_keys()
        found: set[str] = set()
        _example_keys(full_example(), "", keys, found)
        assert set() == found - set(key_rows()) - keys.sections
        assert NOT_IN_FULL_EXAMPLE == keys.leaves - found


@pytest.mark.parametrize("kind", ALERT_KINDS)
def test_alert_kinds_are_listed_in_the_kind_row(kind: str) -> None:
    """The `alerts.rules[].kind` row names every kind."""
    assert f"`{kind}`" in key_rows()["alerts.rules[].kind"].validation
