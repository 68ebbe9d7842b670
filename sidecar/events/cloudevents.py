"""An app's publish request as a CloudEvent 1.0, and that event as AMQP 0-9-1 properties.

Binary mode in (HTTP): the body is the event's data and `ce-*` headers carry the
attributes; `ce-id` or `Idempotency-Key` names the event, else a new UUID does.
Structured mode in (`Content-Type: application/cloudevents+json`): the JSON
object holds the attributes and `data` or `data_base64`. Out (AMQP), always
binary mode: `ce-*` application headers, `content_type` = the data's type,
`message_id` = `ce-id`, `timestamp`, persistent delivery.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sidecar.errors import ErrorCode, ProxyError

TOPIC = re.compile(r"[A-Za-z0-9_.-]{1,255}")
STRUCTURED = "application/cloudevents+json"
#: CloudEvents attribute names: lower-case letters and digits, at most 20 (the spec's advice).
_ATTRIBUTE = re.compile(r"[a-z0-9]{1,20}")
_REQUIRED = ("id", "source", "specversion", "type")


@dataclass(slots=True)
class Event:
    """One event ready to publish or spool; `headers` are its AMQP application headers."""

    id: str
    topic: str
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    time: float = 0.0  # epoch seconds, from ce-time
    seq: int = 0  # arrival order, set by the relay

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "topic": self.topic,
            "content_type": self.content_type,
            "headers": self.headers,
            "time": self.time,
        }


def bad_request(message: str) -> ProxyError:
    return ProxyError(ErrorCode.BAD_REQUEST, message)


def from_http(
    topic: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    source: str,
    now: float,
) -> Event:
    """The event an app's `POST /v1/publish/{topic}` describes; ProxyError 400 if invalid."""
    if not TOPIC.fullmatch(topic):
        raise bad_request(f"invalid topic {topic[:80]!r}: 1-255 letters, digits, '_', '.' or '-'")
    fields: dict[str, str] = {}
    for name, value in headers:
        fields.setdefault(name.decode("latin-1").lower(), value.decode("latin-1").strip())
    content_type = fields.get("content-type", "application/octet-stream")
    if content_type.split(";")[0].strip().lower() == STRUCTURED:
        return _structured(topic, body, fields, source=source, now=now)
    attributes: dict[str, str] = {}
    for field_name, field_value in fields.items():
        if field_name.startswith("ce-"):
            key = field_name[3:]
            if not _ATTRIBUTE.fullmatch(key):
                raise bad_request(f"invalid CloudEvents attribute header {field_name!r}")
            attributes[key] = field_value
    if "specversion" in attributes and attributes["specversion"] != "1.0":
        raise bad_request(f"ce-specversion {attributes['specversion']!r}: only 1.0 is supported")
    event_id = attributes.get("id") or fields.get("idempotency-key") or str(uuid.uuid4())
    attributes["id"] = event_id
    return _event(topic, attributes, content_type, body, source=source, now=now, extra=fields)


def _structured(
    topic: str, body: bytes, fields: dict[str, str], *, source: str, now: float
) -> Event:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"structured CloudEvent is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise bad_request("structured CloudEvent must be a JSON object")
    if document.get("specversion") != "1.0":
        raise bad_request('structured CloudEvent needs "specversion": "1.0"')
    missing = [name for name in ("id", "source", "type") if not document.get(name)]
    if missing:
        raise bad_request(f"structured CloudEvent lacks {', '.join(missing)}")
    if "data" in document and "data_base64" in document:
        raise bad_request("structured CloudEvent has both data and data_base64")
    content_type = str(document.get("datacontenttype") or "application/json")
    if "data_base64" in document:
        try:
            data = base64.b64decode(str(document["data_base64"]), validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("data_base64 is not valid base64") from None
    elif "data" not in document:
        data = b""
    elif isinstance(document["data"], str) and not content_type.endswith("json"):
        data = document["data"].encode()
    else:
        data = json.dumps(document["data"], separators=(",", ":")).encode()
    attributes: dict[str, str] = {}
    for key, value in document.items():
        if key in ("data", "data_base64", "datacontenttype"):
            continue
        if not _ATTRIBUTE.fullmatch(key):
            raise bad_request(f"invalid CloudEvents attribute {key!r}")
        attributes[key] = value if isinstance(value, str) else json.dumps(value)
    return _event(topic, attributes, content_type, data, source=source, now=now, extra=fields)


def _event(
    topic: str,
    attributes: dict[str, str],
    content_type: str,
    body: bytes,
    *,
    source: str,
    now: float,
    extra: dict[str, str],
) -> Event:
    attributes.setdefault("source", source)
    attributes.setdefault("type", topic)
    attributes["specversion"] = "1.0"
    # AMQP short strings (message_id, content_type) hold at most 255 bytes.
    if len(attributes["id"].encode()) > 255:
        raise bad_request("the event id (ce-id or Idempotency-Key) is longer than 255 bytes")
    if len(content_type.encode()) > 255:
        raise bad_request("Content-Type is longer than 255 bytes")
    when = now
    if "time" in attributes:
        text = attributes["time"]
        try:
            stamp = datetime.fromisoformat(text)
        except ValueError:
            stamp = None
        if stamp is None or stamp.tzinfo is None or "T" not in text.upper():
            raise bad_request(
                f"ce-time {text[:80]!r} is not an RFC 3339 time (date, time and zone, "
                "e.g. 2026-12-05T17:00:00Z)"
            )
        when = stamp.timestamp()
        if when < 0:
            raise bad_request(f"ce-time {text[:80]!r} is before 1970 (AMQP timestamps)")
    else:
        attributes["time"] = (
            datetime.fromtimestamp(now, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
    headers = {f"ce-{key}": value for key, value in attributes.items()}
    for name in ("traceparent", "tracestate"):
        if name in extra:
            headers[name] = extra[name]
    return Event(
        id=attributes["id"],
        topic=topic,
        content_type=content_type,
        body=body,
        headers=headers,
        time=when,
    )
