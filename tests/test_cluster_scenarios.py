"""Scenarios: the service on a three-node NATS cluster with ``nats.replicas: 3``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from pipeline import nats_bridge
from pipeline.events import consumer_name
from pipeline.nats_bridge import StreamSetupError
from tests.conftest import StartBackend
from tests.harness import ClusterNode, NatsCluster, call_event, make_config, running_service

STREAMS = ("test-signals", "test-signals-dead-letters", "test-signals-given-up")
DOMAIN_CONSUMER = consumer_name("ok.vn")


async def _streams(cluster: NatsCluster, node: ClusterNode) -> dict[str, dict[str, Any]]:
    """Each stream ``node`` holds, by name, with its config, cluster and consumers (from /jsz)."""
    report = await cluster.jsz(node)
    return {
        stream["name"]: stream
        for account in report.get("account_details", [])
        for stream in account.get("stream_detail", [])
    }


def _consumers(streams: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {consumer["name"]: consumer for stream in streams.values() for consumer in stream.get("consumer_detail", [])}


def _peers(node: ClusterNode, detail: dict[str, Any]) -> set[str]:
    """The nodes holding a stream or consumer that ``node`` reported: ``node`` itself (it lists
    only what it holds), the leader and the replicas it names (every peer but itself)."""
    cluster = detail.get("cluster", {})
    return {node.name, cluster.get("leader", ""), *(replica["name"] for replica in cluster.get("replicas", []))} - {""}


async def _wait_assets(
    cluster: NatsCluster, node: ClusterNode, consumers: tuple[str, ...] = ("dead-letter-writer",)
) -> dict[str, dict[str, Any]]:
    """``node``'s streams once it holds, each with a leader, the three streams and ``consumers``."""
    while True:
        streams = await _streams(cluster, node)
        held = _consumers(streams)
        assets = [*(streams.get(name) for name in STREAMS), *(held.get(name) for name in consumers)]
        if all(asset is not None and asset.get("cluster", {}).get("leader") for asset in assets):
            return streams
        await trio.sleep(0.05)


async def _wait_client_request(cluster: NatsCluster, node: ClusterNode) -> None:
    """Until the service, connected to ``node``, has made a request (nats-py subscribes to replies first)."""
    while True:
        report = await cluster.monitor(node, "connz", subs="true")
        if any(c.get("name") == "telephony-forwarder" and c.get("subscriptions_list") for c in report["connections"]):
            return
        await trio.sleep(0.05)


async def test_every_stream_and_consumer_has_three_replicas_and_events_flow(
    nats_cluster: NatsCluster, start_backend: StartBackend
):
    backend = await start_backend()
    backend.release = trio.Event()
    # One in flight: the second event finds no room, so the domain's consumer fetches it.
    config = make_config(
        nats_cluster.urls, {"ok.vn": [backend.url]}, nats={"replicas": 3}, forwarding={"max_in_flight_per_domain": 1}
    )
    with trio.fail_after(30):
        await nats_cluster.wait_meta_leader()
        async with running_service(config) as service:
            accepted = [
                await service.post_event(call_event("ok.vn", call_id, event_id=f"{call_id}-1"))
                for call_id in ("replicated", "fetched")
            ]
            backend.release.set()
            await backend.completed.wait_value(2)
            reporter = nats_cluster.nodes[0]
            streams = await _wait_assets(nats_cluster, reporter, ("dead-letter-writer", DOMAIN_CONSUMER))
    assert [response.status_code for response in accepted] == [202, 202]
    assert [body["event_id"] for body in backend.bodies()] == ["replicated-1", "fetched-1"]
    every_node = {node.name for node in nats_cluster.nodes}
    for name in STREAMS:
        assert streams[name]["config"]["num_replicas"] == 3, name
        assert _peers(reporter, streams[name]) == every_node, name
    consumers = _consumers(streams)
    assert consumers[DOMAIN_CONSUMER]["stream_name"] == "test-signals"
    assert consumers["dead-letter-writer"]["stream_name"] == "test-signals-given-up"
    for name in (DOMAIN_CONSUMER, "dead-letter-writer"):
        assert consumers[name]["config"]["num_replicas"] == 3, name
        assert _peers(reporter, consumers[name]) == every_node, name


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


async def test_more_replicas_than_servers_stop_the_start_with_one_line(
    nats_cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch
):
    # A cluster still meeting its peers answers as a too small one does ("no
    # suitable peers"): the start waits it out, then names the setting (exit 2).
    monkeypatch.setattr(nats_bridge, "JETSTREAM_READY_TIMEOUT_SECONDS", 2.0)
    config = make_config(nats_cluster.urls, {}, nats={"replicas": 5})
    with trio.fail_after(30), capture_logs() as logs:
        await nats_cluster.wait_meta_leader()
        with pytest.raises(BaseExceptionGroup) as raised:
            async with running_service(config):
                pass
    [error] = _leaves(raised.value)
    assert isinstance(error, StreamSetupError)
    line = str(error)
    assert line.startswith("nats.replicas: the NATS cluster has no 5 servers to hold stream 'test-signals' (")
    assert line.endswith("): lower nats.replicas or add servers") and "\n" not in line
    assert any(entry["event"].startswith("JetStream not ready") for entry in logs)


async def test_a_start_before_the_cluster_has_a_leader_waits_for_it(
    start_backend: StartBackend, nursery: trio.Nursery, tmp_path: Path
):
    # One node of three cannot elect a meta leader: JetStream stays silent
    # until the others come, and the service's start waits instead of failing.
    cluster = NatsCluster(tmp_path / "nats-cluster")
    first, *others = cluster.nodes
    await nursery.start(cluster.run_node, first)
    backend = await start_backend()
    # Each unanswered JetStream request costs the service publish_timeout_seconds.
    config = make_config(cluster.urls, {"ok.vn": [backend.url]}, nats={"replicas": 3, "publish_timeout_seconds": 1})

    async def start_the_others_once_the_service_asks() -> None:
        await _wait_client_request(cluster, first)
        for node in others:
            await nursery.start(cluster.run_node, node)

    with trio.fail_after(30), capture_logs() as logs:
        nursery.start_soon(start_the_others_once_the_service_asks)
        async with running_service(config) as service:
            accepted = await service.post_event(call_event("ok.vn", "late-cluster", event_id="late-1"))
            await backend.wait_count(1)
    assert accepted.status_code == 202
    assert [body["event_id"] for body in backend.bodies()] == ["late-1"]
    waits = [entry for entry in logs if entry["event"].startswith("JetStream not ready")]
    assert waits and all(entry["log_level"] == "warning" for entry in waits)


async def test_losing_the_event_streams_leader_the_service_still_accepts_and_delivers(
    nats_cluster: NatsCluster, start_backend: StartBackend
):
    backend = await start_backend()
    config = make_config(
        nats_cluster.urls, {"ok.vn": [backend.url]}, nats={"replicas": 3, "publish_timeout_seconds": 2}
    )
    refusals: list[int] = []
    with trio.fail_after(30):
        await nats_cluster.wait_meta_leader()
        async with running_service(config) as service:
            assert (await service.post_event(call_event("ok.vn", "before", event_id="before-1"))).status_code == 202
            await backend.wait_count(1)
            streams = await _wait_assets(nats_cluster, nats_cluster.nodes[0])
            lost = nats_cluster.node(streams["test-signals"]["cluster"]["leader"])
            nats_cluster.stop(lost)
            # While the stream elects a new leader (and the client reconnects, if
            # it was on the lost node) a POST may be refused; the client retries
            # the same event_id, as the refusal tells it to.
            while (response := await service.post_event(call_event("ok.vn", "after", event_id="after-1"))).is_error:
                refusals.append(response.status_code)
                await trio.sleep(0.1)
            await backend.count.wait_value(lambda _: "after-1" in {body["event_id"] for body in backend.bodies()})
            survivor = next(node for node in nats_cluster.nodes if node is not lost)
            after = await _streams(nats_cluster, survivor)
    assert response.status_code == 202
    assert set(refusals) <= {500, 503}
    assert {body["event_id"] for body in backend.bodies()} == {"before-1", "after-1"}
    assert after["test-signals"]["cluster"].get("leader") not in (None, lost.name)
    assert after["test-signals"]["config"]["num_replicas"] == 3
