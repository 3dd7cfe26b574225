"""Scenarios: API keys on the ingress, the admin credential, a separate admin address, rate limits."""

from __future__ import annotations

import base64
import socket
from typing import Any

import httpx
import trio

from pipeline.access import sha256_hex
from pipeline.config import load_config
from tests.conftest import StartBackend
from tests.harness import call_event, free_port, make_config, running_service, write_config

CLOUDGO_KEY = "key-for-cloudgo-0123456789"
ANY_KEY = "key-for-everything-0123456789"
ADMIN_PASSWORD = "correct horse battery staple"

ADMIN_ROUTES = [
    ("GET", "/"),
    ("GET", "/static/dashboard.js"),
    ("GET", "/api/events"),
    ("GET", "/api/stats"),
    ("GET", "/api/stream/messages"),
    ("GET", "/api/logs"),
    ("GET", "/api/logs/domains"),
    ("GET", "/api/config/routes"),
    ("POST", "/api/config/reload"),
    ("GET", "/api/dead-letters"),
    ("POST", "/api/dead-letters/some-event/replay"),
    ("DELETE", "/api/dead-letters/some-event"),
]


def _keys(*extra: dict) -> dict:
    return {
        "api_keys": [
            {"name": "cloudgo", "sha256": sha256_hex(CLOUDGO_KEY), "domains": ["VietAnh.CloudGo.vn"]},
            {"name": "ops", "sha256": sha256_hex(ANY_KEY), "domains": ["*"]},
            *extra,
        ]
    }


async def test_api_keys_decide_who_posts_for_which_domain(nats_server, start_backend: StartBackend, tmp_path):
    cloudgo, other = await start_backend(), await start_backend()
    path = tmp_path / "config.yaml"
    write_config(path, nats_server.url, {"vietanh.cloudgo.vn": [cloudgo.url], "other.vn": [other.url]}, ingress=_keys())
    with trio.fail_after(30):
        async with running_service(load_config(path), config_path=path) as service:

            async def post(domain: str, key: str | None) -> httpx.Response:
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                return await service.client.post(f"{service.url}/events", json=call_event(domain, "c"), headers=headers)

            no_key = await post("vietanh.cloudgo.vn", None)
            assert no_key.status_code == 401 and no_key.headers["www-authenticate"] == "Bearer"
            assert "missing or invalid API key" in no_key.json()["error"]
            assert (await post("vietanh.cloudgo.vn", "guessed")).status_code == 401
            forbidden = await post("other.vn", CLOUDGO_KEY)
            assert forbidden.status_code == 403
            assert forbidden.json()["error"] == "API key 'cloudgo' may not post events for domain 'other.vn'"
            assert (await post("vietanh.cloudgo.vn", CLOUDGO_KEY)).status_code == 202
            assert (await post("other.vn", ANY_KEY)).status_code == 202
            await cloudgo.wait_count(1)
            await other.wait_count(1)

            # Keys reload with the routes: a new key works without a restart, a removed one stops.
            new_key = "key-added-by-reload-0123456789"
            write_config(
                path,
                nats_server.url,
                {"vietanh.cloudgo.vn": [cloudgo.url], "other.vn": [other.url]},
                ingress={"api_keys": [{"name": "new", "sha256": sha256_hex(new_key), "domains": ["*"]}]},
            )
            assert (await service.client.post(f"{service.url}/api/config/reload")).status_code == 200
            assert (await post("other.vn", new_key)).status_code == 202
            assert (await post("other.vn", ANY_KEY)).status_code == 401
            await other.wait_count(2)


async def test_every_admin_route_needs_the_credential(nats_server):
    config = make_config(nats_server.url, {}, admin={"password_sha256": sha256_hex(ADMIN_PASSWORD)})
    basic = "Basic " + base64.b64encode(f"operator:{ADMIN_PASSWORD}".encode()).decode()
    with trio.fail_after(30):
        async with running_service(config) as service:
            for method, path in ADMIN_ROUTES:
                refused = await service.client.request(method, f"{service.url}{path}")
                assert refused.status_code == 401, path
                assert refused.headers["www-authenticate"].startswith("Basic"), path
                for wrong_credential in (b"Bearer wrong", b"Basic \xe9"):  # not ASCII: was a 500 and a traceback
                    wrong = await service.client.request(
                        method, f"{service.url}{path}", headers={"Authorization": wrong_credential}
                    )
                    assert wrong.status_code == 401, path
            for header in (basic, f"Bearer {ADMIN_PASSWORD}"):
                allowed = await service.client.get(f"{service.url}/api/stats", headers={"Authorization": header})
                assert allowed.status_code == 200
            page = await service.client.get(f"{service.url}/", headers={"Authorization": basic})
            assert page.status_code == 200 and b"telephony-forwarder" in page.content
            assert (await service.client.get(f"{service.url}/health")).status_code == 200
            assert (await service.post_event(call_event("open.vn", "c"))).status_code == 202


def _client_at(app: Any, host: str, *, named: str = "forwarder.example:8080", **headers: str) -> httpx.AsyncClient:
    """A client that reaches ``app`` in-process as if from ``host`` (the ASGI scope's client address),
    by the name ``named`` (its requests' Host)."""
    transport = httpx.ASGITransport(app=app, client=(host, 40000))
    return httpx.AsyncClient(transport=transport, base_url=f"http://{named}", headers=headers)


async def test_without_a_password_only_loopback_clients_reach_the_admin_surface(nats_server, served_apps):
    config = make_config(nats_server.url, {})
    with trio.fail_after(30):
        async with running_service(config) as service:
            [app] = served_apps
            # A forwarded-for header is anyone's to send: it does not make a client local.
            async with _client_at(app, "203.0.113.7", **{"X-Forwarded-For": "127.0.0.1"}) as stranger:
                for method, path in ADMIN_ROUTES:
                    refused = await stranger.request(method, path)
                    assert refused.status_code == 403, path
                    assert refused.headers["content-type"] == "application/json", path
                    assert "admin.password_sha256" in refused.json()["error"], path
                # The ingress and the health check stay public; health names no tenant.
                assert (await stranger.post("/events", json=call_event("open.vn", "c"))).status_code == 202
                health = await stranger.get("/health")
                assert health.status_code == 200 and health.json() == {"status": "ok", "nats": "connected"}
                assert (await stranger.get("/openapi.json")).status_code == 200
            for local in ("127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"):
                async with _client_at(app, local, named="localhost:8080") as client:
                    assert (await client.get("/api/stats")).status_code == 200, local
                    assert (await client.get("/")).status_code == 200, local
            for name in ("127.0.0.1:8080", "[::1]:8080", "localhost", "dashboard.localhost:8080", socket.gethostname()):
                async with _client_at(app, "127.0.0.1", named=name) as client:
                    assert (await client.get("/api/stats")).status_code == 200, name
            # And over real HTTP on 127.0.0.1.
            assert (await service.client.get(f"{service.url}/api/stats")).status_code == 200


async def test_without_a_password_a_page_that_points_its_own_name_at_loopback_is_refused(nats_server, served_apps):
    # DNS rebinding: a page on another site, open in a browser on this machine (or one an
    # operator reaches the dashboard from through an SSH tunnel), re-points its name to
    # 127.0.0.1. Its requests came from a loopback client with its own name as Host and Origin,
    # and read events with phone numbers, replayed, discarded and reloaded.
    config = make_config(nats_server.url, {})
    with trio.fail_after(30):
        async with running_service(config):
            [app] = served_apps
            rebound = "rebind.attacker.example:8080"
            async with _client_at(
                app, "127.0.0.1", named=rebound, Origin=f"http://{rebound}", **{"X-Requested-With": "page"}
            ) as page:
                for method, path in ADMIN_ROUTES:
                    refused = await page.request(method, path)
                    assert refused.status_code == 403, path
                    assert "does not name this machine" in refused.json()["error"], path


async def test_a_password_lets_other_clients_in(nats_server, served_apps):
    config = make_config(nats_server.url, {}, admin={"password_sha256": sha256_hex(ADMIN_PASSWORD)})
    with trio.fail_after(30):
        async with running_service(config):
            [app] = served_apps
            async with _client_at(app, "203.0.113.7") as stranger:
                assert (await stranger.get("/api/stats")).status_code == 401
                signed_in = await stranger.get("/api/stats", headers={"Authorization": f"Bearer {ADMIN_PASSWORD}"})
                assert signed_in.status_code == 200


STATE_CHANGING_ROUTES = [
    ("POST", "/api/config/reload"),
    ("POST", "/api/dead-letters/999/replay"),
    ("DELETE", "/api/dead-letters/999"),
]


async def test_state_changing_admin_routes_refuse_cross_site_requests(nats_server, tmp_path):
    path = tmp_path / "config.yaml"
    write_config(path, nats_server.url, {}, admin={"password_sha256": sha256_hex(ADMIN_PASSWORD)})
    basic = "Basic " + base64.b64encode(f"operator:{ADMIN_PASSWORD}".encode()).decode()
    with trio.fail_after(30):
        async with running_service(load_config(path), config_path=path) as service:
            # What a browser that holds the admin's basic auth sends when a page on another site asks.
            async with httpx.AsyncClient(base_url=service.url, headers={"Authorization": basic}) as browser:
                for method, route in STATE_CHANGING_ROUTES:
                    form = await browser.request(
                        method, route, content=b"a=1", headers={"Content-Type": "application/x-www-form-urlencoded"}
                    )
                    assert form.status_code == 403, route
                    assert "X-Requested-With" in form.json()["error"], route
                    bare = await browser.request(method, route, headers={"Origin": service.url})
                    assert bare.status_code == 403, route
                    forged = await browser.request(
                        method, route, headers={"Origin": "https://evil.example", "Content-Type": "application/json"}
                    )
                    assert forged.status_code == 403, route
                    assert forged.json()["error"] == (
                        f"cross-site request refused: Origin https://evil.example is not this service's origin "
                        f"({service.url})"
                    ), route
                    assert (await browser.request(method, route, headers={"Origin": "null"})).status_code == 403

                # What the dashboard sends: its own origin and the custom header; scripts send either.
                reload = await browser.post(
                    "/api/config/reload", headers={"Origin": service.url, "X-Requested-With": "dashboard"}
                )
                assert reload.status_code == 200 and reload.json()["status"] == "success"
                replay = await browser.post("/api/dead-letters/999/replay", json={})
                assert replay.status_code == 404 and replay.json()["error"] == "no dead letter with id 999"
                discard = await browser.delete("/api/dead-letters/999", headers={"X-Requested-With": "script"})
                assert discard.status_code == 404
                # Behind a TLS proxy the request's own origin is the one the proxy says the client used.
                proxied = await browser.post(
                    "/api/config/reload",
                    headers={
                        "Origin": "https://forwarder.example.com",
                        "X-Requested-With": "dashboard",
                        "X-Forwarded-Proto": "https",
                        "X-Forwarded-Host": "forwarder.example.com",
                    },
                )
                assert proxied.status_code == 200
                # Reading is unchanged.
                assert (await browser.get("/api/stats", headers={"Origin": "https://evil.example"})).status_code == 200


async def test_admin_surface_on_its_own_address(nats_server, served_apps):
    admin_port = free_port()
    config = make_config(nats_server.url, {}, admin={"listen": f"127.0.0.1:{admin_port}"})
    with trio.fail_after(30):
        async with running_service(config) as service:
            public = service.url
            admin = f"http://127.0.0.1:{admin_port}"
            assert (await service.client.get(f"{public}/api/stats")).status_code == 404
            assert (await service.client.get(f"{public}/")).status_code == 404
            assert (await service.client.get(f"{public}/static/dashboard.js")).status_code == 404
            assert (await service.post_event(call_event("ok.vn", "c"))).status_code == 202
            assert (await service.client.get(f"{admin}/api/stats")).status_code == 200
            assert (await service.client.get(f"{admin}/")).status_code == 200
            assert (await service.client.get(f"{admin}/static/dashboard.js")).status_code == 200
            # The public ingress is not served on the admin address.
            assert (await service.client.post(f"{admin}/events", json=call_event("ok.vn", "c"))).status_code == 404
            assert (await service.client.get(f"{admin}/health")).status_code == 200
            # Without a password the admin address, too, answers loopback clients only.
            public_app, admin_app = served_apps
            async with _client_at(admin_app, "203.0.113.7") as stranger:
                assert (await stranger.get("/api/stats")).status_code == 403
                assert (await stranger.get("/static/dashboard.js")).status_code == 403
            async with _client_at(public_app, "203.0.113.7") as stranger:
                assert (await stranger.post("/events", json=call_event("ok.vn", "c"))).status_code == 202


async def test_rate_limit_per_domain_answers_429_with_retry_after(nats_server, start_backend: StartBackend):
    backend = await start_backend()
    config = make_config(
        nats_server.url,
        {"busy.vn": [backend.url], "quiet.vn": [backend.url]},
        ingress={"rate_limit_per_second": 0.5, "rate_limit_burst": 2},
    )
    with trio.fail_after(30):
        async with running_service(config) as service:
            answers = [(await service.post_event(call_event("busy.vn", f"c{n}"))) for n in range(3)]
            other = await service.post_event(call_event("quiet.vn", "c"))
    assert [a.status_code for a in answers] == [202, 202, 429]
    assert int(answers[2].headers["retry-after"]) >= 1
    assert answers[2].json()["error"] == "too many events for domain 'busy.vn'; retry later"
    assert other.status_code == 202  # one tenant's limit is not another's


async def test_domains_without_a_route_share_one_rate_limit(nats_server, start_backend: StartBackend, tmp_path):
    # Issue 13: the per-domain limit started afresh for every invented domain.
    backend = await start_backend()
    path = tmp_path / "config.yaml"
    limits = {"rate_limit_per_second": 0.001, "rate_limit_burst": 2}
    unrouted_limits = {"unrouted_rate_limit_per_second": 0.001, "unrouted_rate_limit_burst": 3}
    write_config(path, nats_server.url, {"ok.vn": [backend.url]}, ingress=limits | unrouted_limits)
    with trio.fail_after(30):
        async with running_service(load_config(path), config_path=path) as service:
            strangers = [(await service.post_event(call_event(f"stranger-{n}.vn", "c"))) for n in range(5)]
            routed = [(await service.post_event(call_event("ok.vn", f"c{n}"))) for n in range(2)]
            # The limits reload with the routes, and a domain that gets a route gets its own bucket.
            write_config(
                path,
                nats_server.url,
                {"ok.vn": [backend.url], "stranger-9.vn": [backend.url]},
                ingress=limits | {"unrouted_rate_limit_per_second": 0.001, "unrouted_rate_limit_burst": 1},
            )
            assert (await service.client.post(f"{service.url}/api/config/reload")).status_code == 200
            after_reload = [
                await service.post_event(call_event("stranger-9.vn", "c")),
                await service.post_event(call_event("stranger-10.vn", "c")),
                await service.post_event(call_event("stranger-11.vn", "c")),
            ]
            await backend.wait_count(3)
    assert [a.status_code for a in strangers] == [202, 202, 202, 429, 429]
    assert (
        strangers[3].json()["error"]
        == "too many events for domains without a route (they share one limit); retry later"
    )
    assert int(strangers[3].headers["retry-after"]) >= 1
    assert [a.status_code for a in routed] == [202, 202]
    assert [a.status_code for a in after_reload] == [202, 202, 429]
