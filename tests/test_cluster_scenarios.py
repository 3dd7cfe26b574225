"""Scenarios: the service on a three-node NATS cluster with ``nats.replicas: 3``."""

from __future__ import annotations

from typing import Any

import trio

from pipeline.events import consumer_name
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


async def _wait_assets(cluster: NatsCluster, node: ClusterNode) -> dict[str, dict[str, Any]]:
    """``node``'s streams once it holds, each with a leader, the three streams and the two consumers."""
    while True:
        streams = await _streams(cluster, node)
        consumers = _consumers(streams)
        assets = [*(streams.get(name) for name in STREAMS), consumers.get(DOMAIN_CONSUMER)]
        assets.append(consumers.get("dead-letter-writer"))
        if all(asset is not None and asset.get("cluster", {}).get("leader") for asset in assets):
            return streams
        await trio.sleep(0.05)


async def test_every_stream_and_consumer_has_three_replicas_and_events_flow(
    nats_cluster: NatsCluster, start_backend: StartBackend
):
    backend = await start_backend()
    config = make_config(nats_cluster.urls, {"ok.vn": [backend.url]}, nats={"replicas": 3})
    with trio.fail_after(30):
        await nats_cluster.wait_meta_leader()
        async with running_service(config) as service:
            accepted = await service.post_event(call_event("ok.vn", "replicated", event_id="replicated-1"))
            await backend.wait_count(1)
            reporter = nats_cluster.nodes[0]
            streams = await _wait_assets(nats_cluster, reporter)
    assert accepted.status_code == 202
    assert [body["event_id"] for body in backend.bodies()] == ["replicated-1"]
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
