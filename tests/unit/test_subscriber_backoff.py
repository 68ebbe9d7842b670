"""The subscriber's pure decisions: outcome of a status, back-off, Retry-After, attempt
counts from the quorum queue's headers, and the HTTP headers of a delivery."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.backoff import backoff_delay
from sidecar.events.subscriber import (
    Outcome,
    classify,
    http_headers,
    previous_attempts,
    retry_after,
)


class TestClassify:
    @pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
    def test_2xx_acks(self, status: int) -> None:
        """Any 2xx means the app took the event."""
        assert Outcome.ACK == classify(status)

    @pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599, 301, 304, 100])
    def test_transient_and_other_non_2xx_answers_retry(self, status: int) -> None:
        """408, 429, 5xx - and redirects, which are not followed - are retried."""
        assert Outcome.RETRY == classify(status)

    @pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 413, 415, 422, 499])
    def test_other_4xx_are_final(self, status: int) -> None:
        """Any other 4xx says the event itself is wrong: no retry helps."""
        assert Outcome.DEAD == classify(status)


class TestBackoff:
    def test_doubles_from_initial_up_to_the_cap(self) -> None:
        """Without jitter's random part (rng.random() == 1) the waits are 1, 2, 4, 8, 10, 10."""
        always_one = random.Random()
        always_one.random = lambda: 1.0  # type: ignore[method-assign]
        assert [1.0, 2.0, 4.0, 8.0, 10.0, 10.0] == [
            backoff_delay(n, 1.0, 10.0, always_one) for n in range(1, 7)
        ]

    @given(
        failed=st.integers(min_value=1, max_value=1000),
        initial=st.floats(min_value=0.001, max_value=60),
        cap=st.floats(min_value=0.001, max_value=3600),
        seed=st.integers(),
    )
    def test_jitter_keeps_at_least_half_and_never_exceeds_the_cap(
        self, failed: int, initial: float, cap: float, seed: int
    ) -> None:
        """Every wait lies in [base / 2, base], base = min(cap, initial * 2**(failed - 1))."""
        base = min(cap, initial * 2.0 ** min(failed - 1, 62))
        delay = backoff_delay(failed, initial, cap, random.Random(seed))
        assert base / 2 <= delay <= base


class TestRetryAfter:
    NOW = 1_700_000_000.0

    def test_delta_seconds(self) -> None:
        """`Retry-After: 120` is 120 seconds."""
        assert 120.0 == retry_after(" 120 ", self.NOW)

    def test_http_date(self) -> None:
        """An HTTP-date is the time from now until then."""
        then = format_datetime(datetime.fromtimestamp(self.NOW + 30, UTC), usegmt=True)
        assert 30.0 == retry_after(then, self.NOW)

    def test_a_date_in_the_past_means_now(self) -> None:
        """A date already gone asks for no wait, never a negative one."""
        then = format_datetime(datetime.fromtimestamp(self.NOW - 30, UTC), usegmt=True)
        assert 0.0 == retry_after(then, self.NOW)

    @pytest.mark.parametrize("value", [None, "", "soon", "-5", "1.5", "Mon, 99 Foo 2024"])
    def test_absent_or_malformed_is_none(self, value: str | None) -> None:
        """No usable value: the normal back-off applies."""
        assert retry_after(value, self.NOW) is None


class TestPreviousAttempts:
    @pytest.mark.parametrize(
        ("headers", "expected"),
        [
            ({}, 0),
            ({"x-delivery-count": 0}, 0),
            ({"x-delivery-count": 3}, 3),
            ({"x-delivery-count": 1, "x-acquired-count": 4}, 4),  # RabbitMQ 4: returns count too
            ({"x-delivery-count": "2"}, 2),
            ({"x-delivery-count": True}, 0),
            ({"x-delivery-count": [1]}, 0),
        ],
    )
    def test_from_the_quorum_queue_counts(self, headers: dict[str, object], expected: int) -> None:
        """The larger broker count; anything that is not a count is ignored."""
        assert expected == previous_attempts(headers)


class TestHttpHeaders:
    def test_ce_headers_trace_context_and_content_type(self) -> None:
        """ce-* attributes, traceparent and tracestate pass; other AMQP headers do not."""
        amqp = {
            "ce-id": "e1",
            "ce-specversion": "1.0",
            "CE-Type": "t",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "a=1",
            "x-delivery-count": 2,
            "app-header": "no",
        }
        assert {
            "ce-id": "e1",
            "ce-specversion": "1.0",
            "ce-type": "t",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "a=1",
            "Content-Type": "application/json; charset=utf-8",
        } == http_headers(amqp, "application/json; charset=utf-8")

    def test_typed_amqp_values_become_text(self) -> None:
        """Numbers, booleans, bytes and AMQP timestamps are written as text (RFC 3339)."""
        amqp = {
            "ce-n": 5,
            "ce-ok": True,
            "ce-raw": b"bytes",
            "ce-time": datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
            "ce-table": {"a": 1},
        }
        assert {
            "ce-n": "5",
            "ce-ok": "true",
            "ce-raw": "bytes",
            "ce-time": "2024-05-01T12:00:00Z",
        } == http_headers(amqp, None)

    def test_values_that_cannot_be_a_header_are_percent_encoded(self) -> None:
        """Non-ASCII and control characters are percent-encoded as the CloudEvents HTTP
        binding says (with space, '"' and '%'); printable ASCII is left alone."""
        amqp = {
            "ce-subject": "Zürich 100%",
            "ce-plain": 'a "b" 100%',
            "ce-evil": "x\r\nInjected: 1",
        }
        assert {
            "ce-subject": "Z%C3%BCrich%20100%25",
            "ce-plain": 'a "b" 100%',
            "ce-evil": "x%0D%0AInjected:%201",
        } == http_headers(amqp, None)

    def test_invalid_names_and_content_types_are_left_out(self) -> None:
        """A header name that is not an HTTP token, or a bad Content-Type, is dropped."""
        assert {} == http_headers({"ce-bad name": "v"}, "text/plain\r\nX: y")
