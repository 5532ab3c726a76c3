#!/usr/bin/env python3
"""Writes the seed inputs in fuzz/seeds/<target>/ (run from anywhere).

A few realistic inputs per target, in each target's input format (see the
comment at the top of fuzz/fuzz_targets/<target>.rs). They are small and
hand-made; the corpus libFuzzer grows from them lives in fuzz/corpus/ (ignored).
"""

import base64
import hashlib
import hmac
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- AMQP 0-9-1 encoding (RabbitMQ's field types), for envelope_codec ----

def shortstr(s):
    b = s.encode() if isinstance(s, str) else s
    assert len(b) <= 255
    return bytes([len(b)]) + b


def longstr(b):
    b = b.encode() if isinstance(b, str) else b
    return b"S" + struct.pack(">I", len(b)) + b


def longlong(n):
    return b"l" + struct.pack(">q", n)


def array(values):
    body = b"".join(values)
    return b"A" + struct.pack(">I", len(body)) + body


def table_body(entries):
    body = b"".join(shortstr(k) + v for k, v in entries)
    return struct.pack(">I", len(body)) + body


def table(entries):
    return b"F" + table_body(entries)


def properties(content_type=None, headers=None, delivery_mode=None, message_id=None, timestamp=None):
    flags, out = 0, b""
    if content_type is not None:
        flags |= 1 << 15
        out += shortstr(content_type)
    if headers is not None:
        flags |= 1 << 13
        out += table_body(headers)
    if delivery_mode is not None:
        flags |= 1 << 12
        out += bytes([delivery_mode])
    if message_id is not None:
        flags |= 1 << 7
        out += shortstr(message_id)
    if timestamp is not None:
        flags |= 1 << 6
        out += struct.pack(">Q", timestamp)
    return struct.pack(">H", flags) + out


def header_frame(props, body_size, channel=1):
    payload = struct.pack(">HHQ", 60, 0, body_size) + props
    return b"\x02" + struct.pack(">HI", channel, len(payload)) + payload + b"\xce"


def body_frame(body, channel=1):
    return b"\x03" + struct.pack(">HI", channel, len(body)) + body + b"\xce"


def pairs(hs):
    return array([array([longstr(k), longstr(v)]) for k, v in hs])


def envelope_codec():
    body = b'{"ref":"refs/heads/main","after":"9b2c5e1"}'
    hookq = [
        ("hookq-source", longstr("github")),
        ("hookq-key", longstr("github:72d3162e-cc78-11e3-81ab-4c9367dc0958")),
        ("hookq-attempts", longlong(0)),
        ("hookq-received-at", longstr("2026-01-01T00:00:00.000Z")),
        ("hookq-headers", pairs([
            ("content-type", "application/json"),
            ("x-github-event", "push"),
            ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
            ("x-latin1", b"caf\xe9"),
        ])),
    ]
    props = properties("application/json", hookq, 2, "0190f1d2-7a3b-7c4d-8e5f-000000000001", 1767225600)
    write("envelope_codec", "mode0-hookq-message", b"\x00" + header_frame(props, len(body)) + body_frame(body))

    dead = hookq + [
        ("hookq-dead-reason", longstr("rejected")),
        ("hookq-last-error", longstr("HTTP 400")),
        ("hookq-last-status", longlong(400)),
        ("hookq-dead-at", longstr("2026-01-01T00:05:00.000Z")),
        ("hookq-shovelled", longlong(1)),
        ("hookq-not-before", longlong(1767225900000)),
        ("hookq-partition", longstr("3")),
    ]
    dead[2] = ("hookq-attempts", longlong(5))
    props = properties("application/json", dead, 2, "0190f1d2-7a3b-7c4d-8e5f-000000000002", 1767225600)
    write("envelope_codec", "mode0-dead-letter", b"\x00" + header_frame(props, len(body)) + body_frame(body))

    # Dead-lettered by the broker (delivery limit), written by an older hookq:
    # headers as a table, numbers as text.
    broker = [
        ("hookq-source", longstr("stripe")),
        ("hookq-key", longstr("stripe:evt_1")),
        ("hookq-attempts", longstr(" 3 ")),
        ("hookq-headers", table([("content-type", longstr("application/json"))])),
        ("x-death", array([table([
            ("count", longlong(20)),
            ("reason", longstr("delivery_limit")),
            ("queue", longstr("hookq.work")),
        ])])),
        ("x-delivery-count", longlong(20)),
    ]
    write("envelope_codec", "mode1-broker-dead-letter",
          b"\x01" + properties(None, broker, 2, "legacy-1") + b'{"id":"evt_1"}')

    write("envelope_codec", "mode2-minimal-table",
          b"\x02" + table_body([("hookq-source", longstr("s")), ("hookq-key", longstr("s:1"))]) + b"hello")

    # Not a hookq message at all: it gets a stand-in.
    write("envelope_codec", "mode0-foreign-message",
          b"\x00" + header_frame(properties("text/plain", None, 1, "foreign"), 2) + body_frame(b"hi"))

    write("envelope_codec", "mode3-encode", b"\x03" + bytes(range(0, 256, 3)) + b"github:42 x-a 1 x-a 2")


# ---- idempotency_key: source, verify, id_header, id_json_pointer, headers, body ----

def request(lines, headers, body):
    head = "".join(l + "\n" for l in lines)
    hs = "".join(f"{k}: {v}\n" for k, v in headers)
    return (head + hs + "\n").encode() + body


def idempotency_key():
    request_seeds("idempotency_key")


def request_path():
    # The same requests, through the whole path to the target's request; and
    # ids no header can carry (hashed into the key), repeated headers, a
    # latin-1 value and a Connection-named header.
    request_seeds("request_path")
    write("request_path", "hostile-body-ids", request(
        ["byid", "none", "", "/id"],
        [("Content-Type", "application/json"), ("X-Tag", "a"), ("X-Tag", "b")],
        b'{"id":"evt\\n2026-12-06T13:47:00Z INFO forged\\u0001\\u007f"}'))
    write("request_path", "connection-and-latin1", (
        "shop\nnone\n\n\nConnection: x-hop\nX-Hop: 1\nX-Latin: caf\xe9\nContent-Type: text/plain\n\nbody"
    ).encode("latin-1"))


def request_seeds(target):
    write(target, "github", request(
        ["github", "github", "", ""],
        [("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"), ("X-GitHub-Event", "push"),
         ("Content-Type", "application/json")],
        b'{"ref":"refs/heads/main"}'))
    write(target, "stripe-body-id", request(
        ["payments", "stripe", "", ""],
        [("Stripe-Signature", "t=1700000000,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd"),
         ("Idempotency-Key", "fresh-each-time")],
        b'{"id":"evt_1NG8Du2eZvKYlo2CUI79vXWy","object":"event","data":{"object":{"id":"pi_1"}}}'))
    write(target, "custom-header-and-pointer", request(
        ["orders", "hmac-sha256", "x-order-id", "/data/order/id"],
        [("X-Order-Id", "  "), ("X-Signature", "sha256=00")],
        b'{"data":{"order":{"id":12345,"a~b":{"c/d":"x"}}}}'))
    write(target, "none-idempotency-key", request(
        ["shop-1", "none", "", ""],
        [("Idempotency-Key", "order-7-" + "x" * 300), ("X-Event-Id", "ev-1")],
        b"plain text body"))
    write(target, "standard-webhook-id", request(
        ["svix_app", "standard", "", ""],
        [("webhook-id", "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"), ("webhook-timestamp", "1674087231"),
         ("webhook-signature", "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=")],
        b'{"type":"contact.created"}'))


# ---- signature_headers: 29-byte prefix, secret line, headers, body ----

STD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def prefix(now, tolerance_ms, mode=0, ts=0):
    return struct.pack(">qIQBq", now, 0, tolerance_ms, mode, ts)


def sig_request(pre, secret, headers, body):
    return pre + secret.encode() + b"\n" + request([], headers, body)


def signature_headers():
    now = 1700000000
    body = b'{"action":"opened","number":1}'
    gh = hmac.new(b"It's a Secret to Everybody", body, hashlib.sha256).hexdigest()
    write("signature_headers", "github-valid", sig_request(
        prefix(now, 300000), "It's a Secret to Everybody",
        [("X-Hub-Signature-256", "sha256=" + gh), ("X-GitHub-Event", "pull_request")], body))

    t = str(now - 5)
    st = hmac.new(b"whsec_stripe_test", (t + ".").encode() + body, hashlib.sha256).hexdigest()
    write("signature_headers", "stripe-valid-and-rotated", sig_request(
        prefix(now, 300000), "whsec_stripe_test",
        [("Stripe-Signature", f"t={t},v1={'0' * 64},v1={st},v0=deadbeef")], body))

    key = base64.b64decode(STD_SECRET[len("whsec_"):])
    mid = "msg_p5jXN8AQM9LWM0D4loKWxJek"
    sd = base64.b64encode(hmac.new(key, f"{mid}.{t}.".encode() + body, hashlib.sha256).digest()).decode()
    write("signature_headers", "standard-valid", sig_request(
        prefix(now, 300000), "unused",
        [("webhook-id", mid), ("webhook-timestamp", t), ("webhook-signature", f"v1a,xyz v1,{sd}")], body))

    hs = hmac.new(b"custom-secret", body, hashlib.sha256).hexdigest()
    write("signature_headers", "hmac-sha256-bare-hex", sig_request(
        prefix(now, 1000), "custom-secret", [("X-Signature", hs.upper())], body))

    write("signature_headers", "stale-before-epoch", sig_request(
        prefix(-86400, 0), "s",
        [("Stripe-Signature", "t=1,v1=zz"), ("webhook-timestamp", "99999999999999999999"),
         ("webhook-id", "a"), ("webhook-signature", "v1,!!")], b""))

    # Signed by the target itself: standard, timestamp now - 10 s.
    write("signature_headers", "signed-standard-near", sig_request(
        prefix(now, 300000, 1 | (2 << 1) | 64, -10 & 0xFFFFFFFF), "unused",
        [("webhook-id", "msg_1")], body))
    write("signature_headers", "signed-stripe-tampered", sig_request(
        prefix(now, 300000, 1 | (1 << 1) | 8 | 64, 0), "sk", [], body))


# ---- retry_after: the value line, then arbitrary bytes (now as i64 LE first) ----

def retry_after():
    def with_now(value, now, rest=b""):
        return value.encode() + b"\n" + struct.pack("<qI", now, 0) + rest
    write("retry_after", "seconds", with_now("120", 1700000000, struct.pack("<I", 1)))
    write("retry_after", "http-date-future", with_now("Wed, 21 Oct 2015 07:28:00 GMT", 1445412420, struct.pack("<I", 2)))
    write("retry_after", "http-date-year-9999", with_now("Fri, 31 Dec 9999 23:59:59 GMT", 1700000000, struct.pack("<I", 4)))
    write("retry_after", "rfc850-before-epoch", with_now("Sunday, 06-Nov-94 08:49:37 GMT", -1, struct.pack("<I", 3)))
    write("retry_after", "asctime-past", with_now("Sun Nov  6 08:49:37 1994", 1700000000))
    write("retry_after", "padded-seconds", with_now("  18446744073709551615 ", 0))


envelope_codec()
idempotency_key()
request_path()
signature_headers()
retry_after()
