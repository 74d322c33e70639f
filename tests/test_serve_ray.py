"""dit-serve on Ray Serve (ditrt.serve.ray_app): a real local Ray cluster on the CPU, two replicas of the
app behind Serve's HTTP proxy on 127.0.0.1, requests over HTTP (not Serve's local testing mode, which has
neither the proxy nor replica processes to kill). The cluster starts once for the module; the replica-kill
test runs last."""

import asyncio
import base64
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
from ray import serve  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from ditrt.runtime.errors import InputError  # noqa: E402
from ditrt.serve.app import ServeOptions, build_app, load_models  # noqa: E402
from ditrt.serve.ray_app import DitServe, OpenAIErrorMiddleware, build, deployment, needs_gpu  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("serve-ray")]
APP = "ditrt"
SLOW = {
    "prompt": "7",
    "num_inference_steps": 500,
}  # ~0.4 s of engine work on one core: long enough to overlap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def replica_actors() -> dict[str, str]:
    """Live replica id -> actor name (Serve names replica actors SERVE_REPLICA::app#deployment#id)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return {n.rsplit("#", 1)[1]: n for n in names if n.startswith(f"SERVE_REPLICA::{APP}#")}


def running_replicas() -> int:
    status = serve.status().applications.get(APP)
    if status is None or status.status != "RUNNING":
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


@pytest.fixture(scope="module")
def reference(digits_engine):
    """The plain app (no Ray) over the same folder: what every replica must answer."""
    app = build_app(load_models([str(digits_engine)], threads=1), ServeOptions(access_log=None))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def cluster(digits_engine):
    """Serve's proxy URL in front of two replicas (one CPU each) of dit-serve over the digits folder."""
    port = free_port()
    # the proxy reads it at its start (Ray's processes inherit this one's environment)
    env = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "ditrt.serve.ray_app:proxy_middlewares"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment([str(digits_engine)], num_replicas=2)
        deploying = ThreadPoolExecutor(1)  # serve.run has no timeout (it waits for replicas Ray cannot place)
        try:
            deploying.submit(serve.run, app, name=APP, route_prefix="/").result(timeout=120)
        finally:
            deploying.shutdown(wait=False)
        wait_for(lambda: running_replicas() == 2, 60, "two running replicas")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def post_many(client, bodies: list[dict]) -> list:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: client.post("/v1/images/generations", json=b), bodies))


# --- without a cluster --------------------------------------------------------------------------------------


def test_builder_arguments(digits_engine, tmp_path):
    app = build({"folders": f"{digits_engine},d2={digits_engine}", "num_replicas": "2", "queue_size": "4"})
    assert isinstance(app, serve.Application)
    assert not needs_gpu([str(digits_engine), f"d2={digits_engine}"])  # ONNX: num_gpus defaults to 0
    build({"folders": str(digits_engine), "min_replicas": "0", "max_replicas": "3", "num_gpus": "0.5"})
    keys = tmp_path / "keys"
    keys.write_text("# no keys yet\n")
    bad = [
        ({"num_replicas": "2"}, "folders is required"),
        (
            {"folders": str(digits_engine), "num_replicas": "0"},
            "num_replicas '0' is not allowed; use an integer in",
        ),
        (
            {"folders": str(digits_engine), "num_gpus": "one"},
            "num_gpus 'one' is not allowed; use a number in",
        ),
        ({"folders": str(digits_engine), "replicas": "2"}, "unknown argument 'replicas'; use folders"),
        ({"folders": str(digits_engine), "verify": "maybe"}, "verify 'maybe' is not allowed"),
        ({"folders": str(digits_engine), "min_replicas": "1"}, "min_replicas needs max_replicas"),
        ({"folders": str(digits_engine), "num_replicas": "2", "max_replicas": "3"}, "either num_replicas"),
        ({"folders": str(digits_engine), "min_replicas": "3", "max_replicas": "2"}, "min_replicas 3 is over"),
        ({"folders": "/no/such/folder"}, "cannot read the engine folder '/no/such/folder' here"),
        ({"folders": str(digits_engine), "api_key_file": str(keys)}, f"api_key_file '{keys}' holds no keys"),
    ]
    for args, message in bad:
        with pytest.raises(InputError, match=message.replace("(", r"\(")):
            build(args)
    with pytest.raises(InputError, match="unknown argument 'queue'; dit-serve options are queue_size"):
        deployment([str(digits_engine)], queue=3)
    build({"folders": "/no/such/folder", "num_gpus": "1"})  # the folder is read only on the replicas then


def test_check_health_follows_ready(digits_engine):
    """Serve's health check of a replica is the app's /ready: not before the workers start, nor after."""
    app = build_app(load_models([str(digits_engine)], threads=1), ServeOptions(access_log=None))
    replica, client = (
        SimpleNamespace(service=app.state.service),
        TestClient(app),
    )  # no lifespan outside `with`

    def unready() -> str:
        r = client.get("/ready")
        assert r.status_code == 503
        return r.json()["error"]["message"]

    with pytest.raises(RuntimeError, match=unready()):
        asyncio.run(DitServe.check_health(replica))
    with client:
        asyncio.run(DitServe.check_health(replica))
    with pytest.raises(RuntimeError, match=unready()):
        asyncio.run(DitServe.check_health(replica))


def test_proxy_errors_in_openai_shape():
    async def plain(request):
        return PlainTextResponse("Internal Server Error", 500)

    async def full(request):
        return PlainTextResponse("Request dropped due to backpressure", 429, headers={"retry-after": "1"})

    async def mine(request):
        return JSONResponse({"error": {"message": "x", "type": "t", "param": None, "code": "c"}}, 404)

    async def stream(request):
        return StreamingResponse(iter(["event: a\n\n"]), 500, media_type="text/event-stream")

    routes = [Route("/plain", plain), Route("/full", full), Route("/mine", mine), Route("/stream", stream)]
    client = TestClient(OpenAIErrorMiddleware(Starlette(routes=routes)))
    r = client.get("/plain")
    assert r.status_code == 500 and r.json() == {
        "error": {
            "message": "Ray Serve: Internal Server Error",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    r = client.get("/full")
    assert (r.status_code, r.headers["retry-after"], r.json()["error"]["code"]) == (429, "1", "queue_full")
    assert client.get("/mine").json()["error"]["code"] == "c"  # the app's own errors pass untouched
    assert client.get("/stream").text == "event: a\n\n"

    async def silent(scope, receive, send):  # Serve's proxy when the replica died: no answer at all
        pass

    r = TestClient(OpenAIErrorMiddleware(silent)).get("/")
    assert r.status_code == 500 and r.json()["error"]["message"].startswith("Ray Serve: the request failed")


# --- a two-replica cluster ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_answers_as_the_plain_app(cluster, reference):
    body = {"prompt": "7", "seed": 3, "num_inference_steps": 8, "n": 2}
    want = reference.post("/v1/images/generations", json=body).json()
    r = cluster.post("/v1/images/generations", json=body, headers={"X-Request-Id": "ray-test-1"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert [d["b64_json"] for d in got["data"]] == [d["b64_json"] for d in want["data"]]
    assert {k: got[k] for k in ("output_format", "size", "quality", "background")} == {
        k: want[k] for k in ("output_format", "size", "quality", "background")
    }
    assert got["ditrt"]["seeds"] == [3, 4] and got["ditrt"]["request_id"] == "ray-test-1"
    assert r.headers.get_list("x-request-id") == ["ray-test-1"]  # once: the proxy's, not the app's as well
    assert r.headers["x-ditrt-replica"] in replica_actors()
    r = cluster.post("/v1/images/generations", json={"prompt": "7", "size": "64x64"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "size"
    assert cluster.get("/v1/models").json()["data"][0]["id"] == "digits"
    assert len(cluster.get("/v1/models").headers.get_list("x-request-id")) == 1  # the proxy's


@pytest.mark.slow
def test_requests_spread_over_both_replicas(cluster):
    seen = set()
    for _ in range(3):  # Serve picks the less busy of two replicas: concurrent requests reach both
        responses = post_many(cluster, [SLOW] * 6)
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        seen |= {r.headers["x-ditrt-replica"] for r in responses}
        if len(seen) == 2:
            break
    assert seen == set(replica_actors())


@pytest.mark.slow
def test_streaming_through_the_proxy(cluster, reference):
    body = {"prompt": "3", "seed": 5, "num_inference_steps": 400, "stream": True, "partial_images": 2}
    events, stamps = [], []
    with cluster.stream("POST", "/v1/images/generations", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[len("data: ") :])))
                stamps.append(time.monotonic())
    assert [k for k, _ in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e["partial_image_index"] for _, e in events[:2]] == [0, 1]
    assert all(k == e["type"] for k, e in events)
    done = events[-1][1]
    want = reference.post(
        "/v1/images/generations", json={**body, "stream": False, "partial_images": 0}
    ).json()
    assert done["b64_json"] == want["data"][0]["b64_json"] and done["ditrt"]["seeds"] == [5]
    assert base64.b64decode(events[0][1]["b64_json"]).startswith(b"\x89PNG")
    # streamed, not buffered by the proxy: the first preview came ~2/3 of the denoising (~0.2 s) before the end
    assert stamps[-1] - stamps[0] > 0.05, stamps


@pytest.mark.slow
def test_a_killed_replica_is_replaced(cluster):
    """Kill a replica while requests run: every request still gets an answer (200, or an OpenAI-shaped 5xx for
    the ones the dead replica held), Serve starts a new replica, and it serves."""
    before = replica_actors()
    outcomes, errors, stop = [], [], threading.Event()

    def client_loop() -> None:
        while not stop.is_set():
            t = time.monotonic()
            try:
                r = cluster.post("/v1/images/generations", json=SLOW, timeout=30)
            except httpx.HTTPError as e:  # no answer at all: what must not happen
                errors.append(repr(e))
                continue
            try:
                shaped = r.status_code == 200 or set(r.json()["error"]) == {
                    "message",
                    "type",
                    "param",
                    "code",
                }
            except (ValueError, KeyError, TypeError):
                shaped = False
            outcomes.append((t, r.status_code, r.headers.get("x-ditrt-replica"), shaped or r.text[:200]))

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        busy = wait_for(lambda: {o[2] for o in outcomes if o[1] == 200}, 30, "a first answer")
        victim = sorted(busy)[0]
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(before[victim], namespace="serve"), no_restart=True)
        # the controller notices the death at its next health check, then starts another replica (a new id)
        new = wait_for(lambda: set(replica_actors()) - set(before), 60, "a new replica actor")
        wait_for(
            lambda: running_replicas() == 2 and victim not in replica_actors(), 60, "two running replicas"
        )
        replaced_at = time.monotonic()
        wait_for(lambda: any(o[2] in new and o[1] == 200 for o in outcomes), 30, "the new replica's answers")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    statuses = [o[1] for o in outcomes]
    summary = {s: statuses.count(s) for s in sorted(set(statuses))}
    print(f"\nkill test: {len(outcomes)} requests {summary}; replaced in {replaced_at - killed_at:.1f} s")
    assert not errors, errors
    assert set(statuses) <= {200, 500, 503}, summary
    assert all(o[3] is True for o in outcomes), [o for o in outcomes if o[3] is not True]
    assert all(o[1] == 200 for o in outcomes if o[0] > replaced_at), summary
    responses = post_many(cluster, [SLOW] * 6)
    assert all(r.status_code == 200 for r in responses)
