"""The hot path's NATS connection (pipeline/nats_link.py) against the real nats-server.

The service's own use of it (publishing, deleting forwarded events, a link
replaced after an outage) is exercised by the scenario tests (and here, the one
outage whose timing only a held nats-py reconnect makes certain): every accepted
event goes over it, tests/test_outage_scenarios.py stops and restarts the
server under load, and tests/test_retention_scenarios.py connects with a user
and password in the URL.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import pytest
import trio
import trio.testing
import trustme
from nats.aio.client import Client as NatsClient
from trio_asyncio import aio_as_trio

from pipeline.events import parse_event
from pipeline.nats_bridge import PublishReceipt, open_jetstream
from pipeline.nats_link import LinkError, NatsLink, Request, header_block, open_nats_link
from tests.harness import NatsServer, call_event, make_config, run_nats_server, serve_limited_nats


async def run_echo_responder(url: str, subject: bytes, *, task_status: trio.TaskStatus[None]) -> None:
    """A plain NATS client that answers each request on ``subject`` with its own payload (a raw socket)."""
    parsed = urlparse(url)
    assert parsed.hostname is not None and parsed.port is not None
    stream = await trio.open_tcp_stream(parsed.hostname, parsed.port)
    await stream.send_all(b'CONNECT {"verbose":false}\r\nSUB %s 1\r\nPING\r\n' % subject)
    buffer = bytearray()
    while b"PONG\r\n" not in buffer:
        buffer += await stream.receive_some(65536)
    del buffer[: buffer.index(b"PONG\r\n") + 6]
    task_status.started()
    while True:
        while (end := buffer.find(b"\r\n")) < 0:
            buffer += await stream.receive_some(65536)
        line = bytes(buffer[:end])
        if not line.startswith(b"MSG "):
            del buffer[: end + 2]
            continue
        _, _, _, reply, size = line.split()
        while len(buffer) < end + 2 + int(size) + 2:
            buffer += await stream.receive_some(65536)
        payload = bytes(buffer[end + 2 : end + 2 + int(size)])
        del buffer[: end + 2 + int(size) + 2]
        await stream.send_all(b"PUB %s %d\r\n%s\r\n" % (reply, len(payload), payload))


async def test_replies_come_back_in_order_whole_and_with_their_status(nats_server: NatsServer, nursery: trio.Nursery):
    await nursery.start(run_echo_responder, nats_server.url, b"echo")
    # Larger than one read from the socket: a reply arrives in pieces.
    large = bytes(range(256)) * 1024
    with trio.fail_after(10):
        async with open_nats_link(urlparse(nats_server.url), "test", 2, io_timeout=2) as link:
            nursery.start_soon(link.serve)
            pending = await link.send_requests(
                [
                    Request("echo", b"first"),
                    Request("$JS.API.INFO", b""),
                    Request("nobody.listens", b"x"),
                    Request("echo", large, header_block({"Nats-Msg-Id": "a:1"})),
                ]
            )
            await pending.wait_answered()
            echoed, info, no_responders, echoed_large = pending.collect()
    assert echoed is not None and (echoed.status, echoed.data) == (None, b"first")
    assert info is not None and "limits" in json.loads(info.data)
    assert no_responders is not None and no_responders.status == "503"
    assert echoed_large is not None and echoed_large.data == large


async def test_requests_waiting_when_the_link_closes_get_no_answer(nats_server: NatsServer, nursery: trio.Nursery):
    served = trio.Event()

    async def serve(link: NatsLink) -> None:
        await link.serve()
        served.set()

    # A subscriber that never answers keeps the request waiting.
    await nursery.start(partial(run_echo_responder, nats_server.url, b"elsewhere"))
    with trio.fail_after(10):
        async with open_nats_link(urlparse(nats_server.url), "test", 2, io_timeout=2) as link:
            nursery.start_soon(serve, link)
            waiting = await link.send_requests([Request("$JS.API.INFO", b""), Request("elsewhere.silent", b"x")])
            link.close()
            await waiting.wait_answered()
            await served.wait()
            after_close = await link.send_requests([Request("$JS.API.INFO", b"")])
            await after_close.wait_answered()
    # The first may have been answered before the close; the silent one never is.
    assert waiting.collect()[1] is None
    assert after_close.collect() == [None]


async def run_silent_subscriber(url: str, subject: bytes, *, task_status: trio.TaskStatus[None]) -> None:
    """A plain NATS client subscribed to ``subject`` that reads each request and never answers."""
    parsed = urlparse(url)
    assert parsed.hostname is not None and parsed.port is not None
    async with await trio.open_tcp_stream(parsed.hostname, parsed.port) as stream:
        await stream.send_all(b'CONNECT {"verbose":false}\r\nSUB %s 1\r\nPING\r\n' % subject)
        received = b""
        while b"PONG\r\n" not in received:
            received += await stream.receive_some(65536)
        task_status.started()
        while await stream.receive_some(65536):
            pass


async def test_a_request_left_unanswered_closes_the_link_after_its_timeout(
    nats_server: NatsServer, nursery: trio.Nursery
):
    # A server that does not answer in time is not trusted with the next requests. The link keeps
    # that time itself: the callers wait with no timer of their own.
    await nursery.start(run_silent_subscriber, nats_server.url, b"silent")
    with trio.fail_after(10):  # a guard: before, the request waited for as long as the link stayed up
        async with open_nats_link(urlparse(nats_server.url), "test", 2, io_timeout=0.5) as link:
            nursery.start_soon(link.serve)
            answered = await link.send_requests([Request("$JS.API.INFO", b"")])
            await answered.wait_answered()
            unanswered = await link.send_requests([Request("silent", b"x")])
            await unanswered.wait_answered()
            closed = link.closed
    assert answered.collect()[0] is not None
    assert unanswered.collect() == [None]
    assert closed


async def test_a_message_to_a_listened_inbox_crosses_the_wire_once(nats_server: NatsServer, nursery: trio.Nursery):
    # A consumer's deliveries come to such an inbox: events up to max_payload each, which the
    # server counts against what it holds for this connection before dropping it as slow.
    arrived: list = []
    with trio.fail_after(10):
        async with open_nats_link(urlparse(nats_server.url), "listening", 2, io_timeout=2) as link:
            nursery.start_soon(link.serve)
            inbox = await link.listen(arrived.append)
            await link.publish([Request(inbox.decode(), b"hello")])
            await link.flush()  # the server sent what it delivered before its PONG
            sent_to_link = (await nats_server.connection("listening"))["out_msgs"]
            delivered = [message.data for message in arrived]
    assert delivered == [b"hello"]
    assert sent_to_link == 1


async def test_a_send_a_stopped_server_does_not_read_closes_the_link_instead_of_holding_every_sender(
    nats_server: NatsServer, nursery: trio.Nursery
):
    # The ingress actor's batches, the acks and the dead-letter writer's letters are sent with no
    # deadline of their own; a send waits while the server does not read, the link's lock held.
    returned = trio.Event()

    async def send_more_than_the_sockets_hold(link: NatsLink) -> None:
        await link.send_requests([Request("nobody.listens", b"x" * 900_000) for _ in range(16)])
        returned.set()

    async with open_nats_link(urlparse(nats_server.url), "stopped", 2, io_timeout=1) as link:
        nursery.start_soon(link.serve)
        with nats_server.frozen():
            nursery.start_soon(send_more_than_the_sockets_hold, link)
            with trio.move_on_after(30):  # a guard: before the fix the send returned only once the server read again
                await returned.wait()
            returned_while_stopped, closed_while_stopped = returned.is_set(), link.closed
    assert returned_while_stopped
    assert closed_while_stopped


async def test_a_link_with_wrong_credentials_is_refused(tmp_path: Path, nursery: trio.Nursery):
    url = urlparse(await nursery.start(partial(serve_limited_nats, tmp_path, max_consumers=4)))
    with trio.fail_after(10):
        async with open_nats_link(url, "test", 2, io_timeout=2) as link:
            nursery.start_soon(link.serve)
            pending = await link.send_requests([Request("$JS.API.INFO", b"")])
            await pending.wait_answered()
            assert pending.collect()[0] is not None
        wrong = url._replace(netloc=f"app:wrong@{url.hostname}:{url.port}")
        with pytest.raises(LinkError, match="refused the connection"):
            async with open_nats_link(wrong, "test", 2, io_timeout=2):
                pass


async def test_a_link_to_a_server_that_requires_tls(tmp_path: Path, nursery: trio.Nursery, test_ca: trustme.CA):
    certificate = test_ca.issue_cert("127.0.0.1")
    certificate.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    certificate.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    conf = tmp_path / "nats-tls.conf"
    files = f'cert_file: "{tmp_path / "cert.pem"}", key_file: "{tmp_path / "key.pem"}"'
    conf.write_text(f"host: 127.0.0.1\nport: -1\ntls {{ {files} }}\n")
    port = await nursery.start(run_nats_server, "the TLS nats-server", conf)
    trusting = ssl.create_default_context()
    test_ca.configure_trust(trusting)
    with trio.fail_after(10):
        # A nats:// URL too: the server's INFO says TLS is required.
        for scheme in ("tls", "nats"):
            async with open_nats_link(
                urlparse(f"{scheme}://127.0.0.1:{port}"), "test", 2, trusting, io_timeout=2
            ) as link:
                nursery.start_soon(link.serve)
                pending = await link.send_requests([Request("nobody.listens", b"x")])
                await pending.wait_answered()
                (reply,) = pending.collect()
            assert reply is not None and reply.status == "503"
        # Not trusted: refused, never sent in the clear.
        with pytest.raises(trio.BrokenResourceError) as refused:
            async with open_nats_link(urlparse(f"tls://127.0.0.1:{port}"), "test", 2, io_timeout=2):
                pass
        assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)


async def test_a_link_broken_before_nats_py_says_its_server_is_gone_waits_for_the_next_one(
    nats_server: NatsServer, nursery: trio.Nursery, monkeypatch
):
    # nats-py stops counting itself connected at once, but says so (its disconnected
    # callback) only once its reconnecting task has closed the old transport. The link,
    # broken by the same outage, came round before that, found no server to open the
    # next link to, and an assert ended the service (once in ~9 runs of the broker outage
    # load test). Here nats-py's reconnecting task is held until the link has come round.
    held = asyncio.Event()
    attempt_reconnect = NatsClient._attempt_reconnect

    async def held_back(client: NatsClient) -> None:
        await held.wait()
        await attempt_reconnect(client)

    async def release() -> None:
        held.set()

    monkeypatch.setattr(NatsClient, "_attempt_reconnect", held_back)
    config = make_config(nats_server.url, {"link.vn": ["http://127.0.0.1:9/"]}).nats
    with trio.fail_after(30):
        async with open_jetstream(config, nats_server.url, 1) as jetstream:
            first = await jetstream._requests_link()
            nats_server.stop()
            await jetstream._link.wait_value(lambda link: link is None)
            await trio.testing.wait_all_tasks_blocked()
            told_at_once = jetstream.connected.value
            await aio_as_trio(release)()
            await jetstream.connected.wait_value(False)
            await nursery.start(nats_server.run)
            await jetstream.connected.wait_value(True)
            second = await jetstream._requests_link()
            reopened = second is not first and first.closed and not second.closed
            [receipt] = await jetstream.publish_batch(
                [parse_event(json.dumps(call_event("link.vn", "after")).encode())]
            )
    assert told_at_once  # the window: the link knew before nats-py said so
    assert reopened
    assert isinstance(receipt, PublishReceipt) and receipt.sequence == 1
