"""The hot path's NATS connection (pipeline/nats_link.py) against the real nats-server.

The service's own use of it (publishing, deleting forwarded events, a link
replaced after an outage) is exercised by the scenario tests: every accepted
event goes over it, tests/test_outage_scenarios.py stops and restarts the
server under load, and tests/test_retention_scenarios.py connects with a user
and password in the URL.
"""

from __future__ import annotations

import json
import ssl
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import pytest
import trio
import trustme

from pipeline.nats_link import LinkError, NatsLink, Request, header_block, open_nats_link
from tests.harness import NatsServer, run_nats_server, serve_limited_nats


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
        async with open_nats_link(urlparse(nats_server.url), "test", 2) as link:
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
        async with open_nats_link(urlparse(nats_server.url), "test", 2) as link:
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


async def test_a_link_with_wrong_credentials_is_refused(tmp_path: Path, nursery: trio.Nursery):
    url = urlparse(await nursery.start(partial(serve_limited_nats, tmp_path, max_consumers=4)))
    with trio.fail_after(10):
        async with open_nats_link(url, "test", 2) as link:
            nursery.start_soon(link.serve)
            pending = await link.send_requests([Request("$JS.API.INFO", b"")])
            await pending.wait_answered()
            assert pending.collect()[0] is not None
        wrong = url._replace(netloc=f"app:wrong@{url.hostname}:{url.port}")
        with pytest.raises(LinkError, match="refused the connection"):
            async with open_nats_link(wrong, "test", 2):
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
            async with open_nats_link(urlparse(f"{scheme}://127.0.0.1:{port}"), "test", 2, trusting) as link:
                nursery.start_soon(link.serve)
                pending = await link.send_requests([Request("nobody.listens", b"x")])
                await pending.wait_answered()
                (reply,) = pending.collect()
            assert reply is not None and reply.status == "503"
        # Not trusted: refused, never sent in the clear.
        with pytest.raises(trio.BrokenResourceError) as refused:
            async with open_nats_link(urlparse(f"tls://127.0.0.1:{port}"), "test", 2):
                pass
        assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
