"""HTTP on the WebSocket port: /health, /metrics, /admin/cluster-status."""

from __future__ import annotations

import asyncio
import json
import uuid

from tests.e2e.support import Router, aget, metric_samples
from tests.helpers import eventually


async def test_health_reports_shards_and_redis(router: Router):
    async def healthy():
        status, _, body = await aget(f"{router.http}/health")
        return json.loads(body) if status == 200 else None

    report = await eventually(healthy, 20, "a healthy router")
    assert report["status"] == "ok"
    assert report["server"].startswith("ingress-")
    assert report["redis"] == "ok"
    assert set(report["shards"]) == {f"shard-{i}" for i in range(4)}
    assert isinstance(report["connections"], int)


async def test_metrics_are_prometheus_text(router: Router):
    drone = await router.drone(f"metrics-{uuid.uuid4().hex[:6]}")
    status, headers, body = await aget(f"{router.http}/metrics")
    await drone.close()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    assert "# TYPE websocket_connections_total gauge" in text
    # One scrape of the port shows every process of the router, each series labelled with it.
    actors = {labels["actor"] for labels, _ in metric_samples(text, "websocket_connections_total")}
    assert actors == {"ingress-0", "ingress-1"}
    shards = {labels["actor"] for labels, _ in metric_samples(text, "sentientedge_sessions")}
    assert shards == {f"shard-{n}" for n in range(4)}
    assert metric_samples(text, "redis_cluster_health")[0][1] == 1.0
    assert metric_samples(text, "sentientedge_handshakes_total")


async def test_metrics_targets_are_prometheus_service_discovery(router: Router):
    status, _, body = await aget(f"{router.http}/metrics/targets")
    assert status == 200
    groups = json.loads(body)
    roles = sorted(group["labels"]["role"] for group in groups)
    assert roles == ["controller"] + ["ingress"] * 2 + ["shard"] * 4
    for group in groups:
        status, _, text = await aget(f"http://{group['targets'][0]}/metrics")
        assert status == 200
        actors = {
            labels["actor"]
            for labels, _ in metric_samples(text.decode(), "sentientedge_process_cpu_seconds_total")
        }
        assert actors <= {group["labels"]["router_actor"]}


async def test_cluster_status_needs_an_admin_token(router: Router):
    url = f"{router.http}/admin/cluster-status"
    status, _, body = await aget(url)
    assert status == 401 and json.loads(body)["error"] == "unauthorized"
    status, _, _ = await aget(url, token="not-a-token")
    assert status == 401
    status, _, body = await aget(url, token=router.token("operator", "op"))
    assert status == 403 and json.loads(body)["error"] == "forbidden"
    status, _, body = await aget(url, token=router.token("admin", "root", amr=["pwd"]))
    assert status == 403 and json.loads(body)["error"] == "mfa_required"


async def test_cluster_status_lists_ingresses_shards_connections_and_drones(router: Router):
    drone_id = f"status-{uuid.uuid4().hex[:6]}"
    drone = await router.drone(drone_id)
    await drone.publish(f"drone/{drone_id}/telemetry", {"lat": 1.5, "lon": 2.5})
    token = router.admin_token()

    async def report_with_drone():
        status, _, body = await aget(f"{router.http}/admin/cluster-status", token=token)
        assert status == 200
        report = json.loads(body)
        mine = [d for d in report["drones"] if d["drone"] == drone_id]
        if mine and mine[0]["last_telemetry"] is not None:
            return report, mine[0]
        return None

    report, mine = await eventually(report_with_drone, 20, "the drone in cluster status")
    assert set(report["ingresses"]) == {"ingress-0", "ingress-1"}
    assert set(report["shards"]) == {f"shard-{i}" for i in range(4)}
    assert report["connections"] >= 1
    assert report["drones_online"] >= 1
    assert mine["online"] is True
    assert mine["last_telemetry"] == {"lat": 1.5, "lon": 2.5}
    await drone.close()


async def test_unknown_path_is_404(router: Router):
    status, _, body = await aget(f"{router.http}/nope")
    assert status == 404 and json.loads(body)["error"] == "not_found"


async def _raw_http(router: Router, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes on the port; the status and body of the answer (the server closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_every_request_gets_an_answer_body_or_not(router: Router):
    body = b'{"instances": 2}'
    post = (
        b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    status, answer = await _raw_http(router, post)
    assert status == 404 and json.loads(answer)["error"] == "not_found"
    status, answer = await _raw_http(router, b"NONSENSE\r\n\r\n")
    assert status == 400 and json.loads(answer)["error"] == "bad_request"
    chunked = b"POST /health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    status, _ = await _raw_http(router, chunked)
    assert status == 411


async def test_a_websocket_path_without_an_upgrade_says_so(router: Router):
    status, _ = await _raw_http(router, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status in (400, 426)
