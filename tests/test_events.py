"""Unit tests: event validation, identity and subject encoding."""

from __future__ import annotations

import json
import uuid

import pytest

from pipeline.events import (
    InvalidEvent,
    consumer_name,
    domain_subject,
    domain_token,
    normalize_domain,
    parse_event,
    parse_strict_json,
    subject_domain,
    token_domain,
)


@pytest.mark.parametrize(
    "domain", ["vietanh.cloudgo.vn", "a", "x-y_z.example.com", "~tilde", "a.*.>", "sp ace", "ünï", "a" * 253]
)
def test_domain_token_is_one_safe_token_and_reversible(domain: str):
    token = domain_token(domain)
    assert not set(token) & set(". *>\t\r\n")
    assert token_domain(token) == domain


def test_domain_subject_keeps_the_pattern_shape():
    subject = domain_subject("call.signal.*", "vietanh.cloudgo.vn")
    assert subject == "call.signal.vietanh~2ecloudgo~2evn"
    assert subject_domain("call.signal.*", subject) == "vietanh.cloudgo.vn"
    assert subject_domain("call.signal.*", "call.other.x") is None
    assert domain_subject("events.*.in", "a.b") == "events.a~2eb.in"


def test_consumer_names_are_distinct_and_bounded():
    long_a, long_b = "a" * 200 + ".vn", "a" * 200 + ".com"
    assert consumer_name(long_a) != consumer_name(long_b)
    assert len(consumer_name(long_a)) < 200
    assert consumer_name("ok.vn") == "forward-ok~2evn"


def test_normalize_domain_lowercases_and_rejects_what_is_not_host_like():
    assert normalize_domain("VietAnh.CloudGo.VN") == "vietanh.cloudgo.vn"
    # "\u212aelvin.vn" (KELVIN SIGN) is "kelvin.vn" once lower-cased: another tenant's name.
    for bad in ["", " ", "a b", "a/b", "a*", "a>", "ünï.vn", "\u212aelvin.vn", "\u0130.vn", "a" * 254, None, 3]:
        with pytest.raises(InvalidEvent):
            normalize_domain(bad)


@pytest.mark.parametrize(
    "domain",
    ["ok.vn", "a", "1", "a-b.vn", "_sip._udp.example.com", "x_.vn", "-a-.vn", "a.b.c.d.e.f", "xn--bcher-kva.ch"],
)
def test_normalize_domain_accepts_every_label_with_a_letter_or_digit(domain: str):
    assert normalize_domain(domain.upper()) == domain


@pytest.mark.parametrize(
    "domain", ["..", ".", "_", "-", "_-_", "a..b", ".ok.vn", "ok.vn.", "ok._.vn", "ok.-.vn", "_.__", "a.b.-"]
)
def test_normalize_domain_refuses_a_label_without_a_letter_or_digit(domain: str):
    # Issue 13: strangers must not be able to spell new "domains" without end
    # (nor name directories like "..": every label needs a letter or digit).
    with pytest.raises(InvalidEvent, match="needs a letter or digit in every dot-separated label"):
        normalize_domain(domain)


def test_parse_event_refuses_a_domain_with_an_empty_label():
    with pytest.raises(InvalidEvent, match="needs a letter or digit"):
        parse_event(b'{"domain": "a..vn"}')


def test_parse_event_keeps_fields_and_adds_an_event_id():
    event = {"domain": "Ok.vn", "call_id": "c-1", "nested": {"x": [1, 2.5, None]}, "name": "Nguyễn"}
    accepted = parse_event(json.dumps(event).encode())
    stored = json.loads(accepted.payload)
    assert stored == event | {"event_id": accepted.event_id}
    assert uuid.UUID(accepted.event_id)
    assert accepted.domain == "ok.vn"
    assert accepted.fields["call_id"] == "c-1"


def test_parse_event_keeps_the_clients_event_id():
    accepted = parse_event(b'{"domain": "ok.vn", "event_id": "pbx-1:42"}')
    assert accepted.event_id == "pbx-1:42"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b'{"domain": "ok.vn", "duration": NaN}', "NaN"),
        (b'{"domain": "ok.vn", "duration": Infinity}', "Infinity"),
        (b'{"domain": "ok.vn", "nested": [1, -Infinity]}', "-Infinity"),
        (b'{"domain": "ok.vn", "duration": 1e400}', "1e400"),
        (b'{"domain": "ok.vn", "duration": -1E400}', "-1E400"),
    ],
)
def test_parse_event_refuses_what_rfc_8259_does_not_allow(body: bytes, named: str):
    with pytest.raises(InvalidEvent, match="body is not valid JSON") as refused:
        parse_event(body)
    assert named in str(refused.value)


def test_parse_event_refuses_an_integer_python_will_not_convert_as_invalid_json():
    with pytest.raises(InvalidEvent, match="body is not valid JSON"):
        parse_event(b'{"domain": "ok.vn", "n": ' + b"1" * 5000 + b"}")


def test_parse_event_stores_strict_json():
    accepted = parse_event(b'{"domain": "ok.vn", "tiny": 1e-400, "big": 123456789012345678901234567890, "x": 1.5}')
    assert parse_strict_json(accepted.payload) == {
        "domain": "ok.vn",
        "tiny": 0.0,
        "big": 123456789012345678901234567890,
        "x": 1.5,
        "event_id": accepted.event_id,
    }
