"""dit-serve: OpenAI's image API over engine folders, in-process (TestClient) and as the real server (dit-serve on
127.0.0.1) where disconnects, signals and timing matter. Images are compared with the Pipeline's own."""

import base64
import contextlib
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from ditrt.serve import ServeOptions, build_app, load_models  # noqa: E402

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def models(digits_engine, text_digits_engine):
    models = load_models([str(digits_engine), str(text_digits_engine)])
    yield models
    for pipe in models.values():
        pipe.close()


@contextlib.contextmanager
def client(models, **options):
    options.setdefault("access_log", None)
    with TestClient(build_app(models, ServeOptions(**options)), raise_server_exceptions=True) as c:
        yield c


@pytest.fixture(scope="module")
def api(models):
    with client(models) as c:
        yield c


def image_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def assert_error(r, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
    assert error["param"] == param and (code is None or error["code"] == code), error
    return error


def test_models_health_ready(api):
    assert api.get("/health").json() == {"status": "ok"}
    assert api.get("/ready").json()["status"] == "ready"
    data = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    assert api.get("/v1/models/digits").json() == data["digits"]
    assert_error(api.get("/v1/models/flux"), 404, "model", "model_not_found")
    assert set(data) == {"digits", "text-digits"}
    assert data["digits"]["ditrt"]["conditioning"] == "class" and data["digits"]["ditrt"]["classes"][7] == "7"
    assert (
        data["text-digits"]["ditrt"]["conditioning"] == "text"
        and "euler" in data["text-digits"]["ditrt"]["samplers"]
    )


def test_images_equal_the_pipelines_with_dit_runs_png_metadata(api, models):
    """n=3 with max_batch 4 (one call) and with max_batch 2 (two turns): the Pipeline's images, the PNG text chunk
    dit-run writes, seeds seed..seed+2."""
    body = {
        "model": "text-digits",
        "prompt": "a handwritten seven",
        "n": 3,
        "seed": 11,
        "num_inference_steps": 6,
    }
    ref = models["text-digits"](prompt="a handwritten seven", batch_size=3, seed=11, steps=6)
    with client(models, max_batch=2) as split:
        for c in (api, split):
            r = c.post(GEN, json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["ditrt"]["seeds"] == [11, 12, 13] and len(out["data"]) == 3
            for item, image, params in zip(out["data"], ref.images, ref.parameters):
                png = image_of(item["b64_json"])
                assert png.format == "PNG" and png.info["parameters"] == params
                # one engine call of 2 vs 3 images: float sums may differ in the last bit, never a visible level
                assert np.abs(np.asarray(png, np.int16) - image.astype(np.int16)).max() <= 1
            assert r.headers["x-request-id"] == out["ditrt"]["request_id"]


def test_class_model_takes_the_prompt_or_class_label(api, models):
    ref = models["digits"](class_label=7, seed=3).images[0]
    for body in (
        {"prompt": "7"},
        {"prompt": "", "class_label": 7},
        {"prompt": "7", "class_label": "7"},
        {"prompt": "07", "class_label": " 7"},
    ):
        r = api.post(GEN, json={"model": "digits", "seed": 3, **body})
        assert r.status_code == 200, (body, r.text)
        assert np.array_equal(np.asarray(image_of(r.json()["data"][0]["b64_json"])), ref)
    assert_error(api.post(GEN, json={"model": "digits", "prompt": "8", "class_label": 7}), 400, "prompt")
    assert_error(api.post(GEN, json={"model": "digits", "prompt": "eleven"}), 422, "class_label")


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_jpeg_and_webp_follow_output_compression(api, fmt):
    sizes = []
    for q in (100, 10):
        body = {
            "model": "text-digits",
            "prompt": "3",
            "seed": 1,
            "num_inference_steps": 2,
            "output_format": fmt,
        }
        out = api.post(GEN, json={**body, "output_compression": q}).json()
        assert out["output_format"] == fmt and image_of(out["data"][0]["b64_json"]).format == fmt.upper()
        sizes.append(len(out["data"][0]["b64_json"]))
    assert sizes[1] < sizes[0]


def test_openai_sdk_streams_partial_images_then_completed(api):
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=api, max_retries=0)
    events = list(
        sdk.images.generate(
            model="text-digits",
            prompt="the digit 4",
            stream=True,
            partial_images=2,
            extra_body={"num_inference_steps": 8, "seed": 5},
        )
    )
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = image_of(events[-1].b64_json)
    assert final.size == (16, 16) and "Seed: 5" in final.info["parameters"]
    # previews are x0 predictions of steps 3 and 5 of 8: images of the same size, not the final one
    previews = [np.asarray(image_of(e.b64_json)) for e in events[:2]]
    assert all(p.shape == np.asarray(final).shape for p in previews)
    assert not np.array_equal(previews[0], np.asarray(final))
    # and the SDK's errors carry our messages
    with pytest.raises(openai.UnprocessableEntityError, match="num_inference_steps 0"):
        sdk.images.generate(model="text-digits", prompt="x", extra_body={"num_inference_steps": 0})


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "digits", "prompt": "7", "response_format": "url"}, 400, "response_format"),
        ({"model": "digits", "prompt": "7", "n": 11}, 400, "n"),
        ({"model": "digits", "prompt": "7", "n": True}, 400, "n"),
        (
            {"model": "digits", "prompt": "7", "steps": 4},
            400,
            "steps",
        ),  # unknown: the API says num_inference_steps
        ({"model": "digits", "prompt": "7", "partial_images": 2}, 400, "partial_images"),
        ({"model": "digits", "prompt": "7", "output_compression": 50}, 400, "output_compression"),
        ({"model": "digits", "prompt": "7", "background": "transparent"}, 400, "background"),
        ({"model": "digits", "prompt": "7", "size": "big"}, 400, "size"),
        ({"prompt": "7"}, 400, "model"),
        ({"model": "flux", "prompt": "7"}, 404, "model"),
        ({"model": "text-digits"}, 400, "prompt"),
        ({"model": "digits", "prompt": "7", "size": "512x512"}, 422, "size"),
        ({"model": "digits", "prompt": "7", "num_inference_steps": 0}, 422, "num_inference_steps"),
        ({"model": "digits", "prompt": "7", "guidance_scale": 1e9}, 422, "guidance_scale"),
        ({"model": "digits", "prompt": "7", "sampler": "ddim"}, 422, "sampler"),
        ({"model": "digits", "prompt": "7", "sampler": "bogus"}, 422, "sampler"),
        ({"model": "digits", "prompt": "7", "size": "0x0"}, 422, "size"),
        ({"model": "text-digits", "prompt": "7", "class_label": 3}, 422, None),
    ],
)
def test_bad_requests_answer_in_openais_error_shape(api, body, status, param):
    error = assert_error(api.post(GEN, json=body), status, param)
    assert error["type"] == "invalid_request_error"
    if param == "steps":
        assert error["message"] == "unknown parameter 'steps'; this API calls it num_inference_steps"


def test_malformed_bodies_routes_and_limits(models, api):
    def post(data, **headers):
        return api.post(GEN, content=data, headers={"content-type": "application/json", **headers})

    assert_error(post(b"{"), 400, code="invalid_json")
    assert_error(post(b"[1]"), 400, code="invalid_json")
    assert_error(post(b'{"prompt": NaN}'), 400, code="invalid_json")
    assert_error(post(b"\xff\xfe"), 400, code="invalid_json")
    assert_error(post(b"[" * 100_000 + b"]" * 100_000), 400, code="invalid_json")  # nested too deeply
    assert_error(api.post(GEN, content=b"prompt=7", headers={"content-type": "text/plain"}), 415)
    assert_error(api.get("/v1/nothing"), 404, code="not_found")
    assert_error(api.get(GEN), 405, code="method_not_allowed")
    assert api.get(GEN).headers["allow"] == "POST"
    assert_error(post(b'{"prompt": "7"}', **{"x-request-id": "bad id!"}), 400, "x-request-id")
    with client(models, max_body_bytes=2048) as small:
        body = json.dumps({"model": "text-digits", "prompt": "x" * 4000}).encode()
        assert_error(small.post(GEN, content=body, headers={"content-type": "application/json"}), 413)


def test_api_keys(models, tmp_path):
    with client(models, api_keys=("k-123456789", "clé-secrète-1")) as c:
        body = {"model": "digits", "prompt": "1", "num_inference_steps": 2}
        assert_error(c.post(GEN, json=body), 401, code="invalid_api_key")
        assert_error(c.post(GEN, json=body, headers={"authorization": "Bearer k-12345678"}), 401)
        assert_error(c.get("/v1/models", headers={"authorization": "Basic k-123456789"}), 401)
        assert c.post(GEN, json=body, headers={"authorization": "Bearer k-123456789"}).status_code == 200
        assert c.post(GEN, json=body, headers={"authorization": "bearer  k-123456789 "}).status_code == 200
        utf8 = {"authorization": "Bearer clé-secrète-1".encode()}  # as curl sends a non-ASCII key
        assert c.post(GEN, json=body, headers=utf8).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_cors_is_off_unless_configured(models, api):
    origin = {"origin": "http://example.test"}
    assert "access-control-allow-origin" not in api.get("/v1/models", headers=origin).headers
    with client(models, cors_origins=("http://example.test",)) as c:
        assert (
            c.get("/v1/models", headers=origin).headers["access-control-allow-origin"]
            == "http://example.test"
        )


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(m[1]) if m else 0.0


def test_metrics_and_access_log(models):
    log = io.StringIO()
    with client(models, access_log=log) as c:
        c.post(GEN, json={"model": "digits", "prompt": "2", "n": 2, "num_inference_steps": 3, "user": "u-1"})
        c.post(GEN, json={"model": "digits", "prompt": "2", "num_inference_steps": 0})
        text = c.get("/metrics").text
    assert metric(text, "ditrt_requests_total", model="digits", status="200") == 1
    assert metric(text, "ditrt_requests_total", model="digits", status="422") == 1
    assert metric(text, "ditrt_images_total", model="digits") == 2
    assert metric(text, "ditrt_steps_total", model="digits") == 3
    for stage in ("queue", "text_encode", "denoise", "decode", "encode"):
        assert metric(text, "ditrt_stage_seconds_count", model="digits", stage=stage) >= 1, stage
    assert metric(text, "ditrt_request_seconds_count", model="digits") == 2
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    posts = [entry for entry in lines if entry["path"] == GEN]
    assert (
        [p["status"] for p in posts] == [200, 422]
        and posts[0]["model"] == "digits"
        and posts[0]["images"] == 2
        and posts[0]["user"] == "u-1"
    )


def in_thread(fn, *args, **kwargs):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, out


def wait_for(predicate, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_queue_full_is_429_with_retry_after_and_small_requests_are_not_starved(models):
    long = {"model": "digits", "prompt": "1", "n": 6, "num_inference_steps": 150, "seed": 1}
    small = {"model": "digits", "prompt": "2", "num_inference_steps": 2, "seed": 2}
    with client(models, queue_size=1, max_batch=1) as c:
        running = lambda: metric(c.get("/metrics").text, "ditrt_in_flight", model="digits") == 1  # noqa: E731
        first, out1 = in_thread(c.post, GEN, json=long)
        wait_for(running)
        second, out2 = in_thread(c.post, GEN, json=small)
        wait_for(lambda: metric(c.get("/metrics").text, "ditrt_queue_depth", model="digits") == 1)
        r = c.post(GEN, json=small)  # running 1 + waiting 1 = full
        assert_error(r, 429, code="queue_full")
        assert int(r.headers["retry-after"]) >= 1
        second.join(60)
        # the small request ran after one unit of the large one, not after all six
        assert out2["r"].status_code == 200 and first.is_alive()
        first.join(60)
        assert out1["r"].status_code == 200 and len(out1["r"].json()["data"]) == 6


def test_timeout_is_504_and_stops_the_steps(models):
    with client(models, timeout_s=0.3) as c:
        r = c.post(GEN, json={"model": "digits", "prompt": "1", "num_inference_steps": 1000})
        assert_error(r, 504, code="timeout")
        text = c.get("/metrics").text
    assert metric(text, "ditrt_cancelled_total", model="digits", reason="timeout") == 1
    assert metric(text, "ditrt_steps_total", model="digits") < 1000


# --- the real server: disconnects, DELETE, SIGTERM ------------------------------------------------------


@contextlib.contextmanager
def dit_serve(*args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ditrt.serve.cli",
            *map(str, args),
            "--port",
            str(port),
            "--access-log",
            "off",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/ready", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < end, "dit-serve did not get ready"
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def steps_run(base: str, **labels) -> float:
    return metric(httpx.get(base + "/metrics").text, "ditrt_steps_total", model="digits")


@pytest.mark.parametrize("stream", [pytest.param(False, marks=pytest.mark.slow), True])
def test_a_client_that_goes_stops_its_generation(digits_engine, stream):
    with dit_serve(digits_engine) as (base, _):
        body = {"prompt": "5", "num_inference_steps": 1000, "stream": stream}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + GEN, json=body, timeout=httpx.Timeout(5, read=0.5))
        wait_for(
            lambda: (
                metric(
                    httpx.get(base + "/metrics").text,
                    "ditrt_cancelled_total",
                    model="digits",
                    reason="client",
                )
                == 1
            )
        )
        ran = steps_run(base)
        time.sleep(0.3)
        assert steps_run(base) == ran < 1000  # stopped, and stays stopped


def test_delete_cancels_a_request_by_id(digits_engine):
    with dit_serve(digits_engine) as (base, _):
        body = {"prompt": "5", "num_inference_steps": 1000}
        thread, out = in_thread(
            httpx.post, base + GEN, json=body, headers={"x-request-id": "job-1"}, timeout=30
        )
        wait_for(lambda: steps_run(base) > 0)
        assert_error(httpx.delete(base + GEN + "/job-2"), 404, "request_id")
        r = httpx.delete(base + GEN + "/job-1")
        assert r.status_code == 200 and r.json()["cancelled"] is True
        thread.join(30)
        assert_error(out["r"], 499, code="cancelled")
        assert steps_run(base) < 1000


def test_sigterm_finishes_running_work_then_exits_0(digits_engine):
    with dit_serve(digits_engine, "--shutdown-timeout", "20") as (base, proc):
        thread, out = in_thread(
            httpx.post, base + GEN, json={"prompt": "5", "num_inference_steps": 300}, timeout=30
        )
        wait_for(lambda: steps_run(base) > 0)
        proc.send_signal(signal.SIGTERM)
        thread.join(30)
        assert out["r"].status_code == 200  # finished, not cut off
        assert proc.wait(30) == 0


@pytest.mark.slow
def test_sigterm_cancels_work_past_the_deadline(digits_engine):
    with dit_serve(digits_engine, "--shutdown-timeout", "0.5") as (base, proc):
        thread, out = in_thread(
            httpx.post, base + GEN, json={"prompt": "5", "num_inference_steps": 1000, "n": 10}, timeout=30
        )
        wait_for(lambda: steps_run(base) > 0)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - start < 10
        thread.join(30)
        assert_error(out["r"], 503, code="shutting_down")  # cancelled at the deadline, answered


def test_cli_errors_are_one_line(tmp_path, digits_engine):
    def run(*args):
        r = subprocess.run(
            [sys.executable, "-m", "ditrt.serve.cli", *map(str, args)], capture_output=True, text=True
        )
        return r.returncode, r.stderr.strip().splitlines()

    code, lines = run(tmp_path / "missing")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    (tmp_path / "keys").write_text("# no keys\n")
    code, lines = run(digits_engine, "--api-key-file", tmp_path / "keys")
    assert code == 2 and lines == [
        f"error: --api-key-file {str(tmp_path / 'keys')!r} holds no keys (one per line)"
    ]
    code, lines = run(digits_engine, "--port", "70000")
    assert code == 2 and len(lines) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, lines = run(digits_engine, "--port", taken.getsockname()[1])
    assert code == 2 and any("address already in use" in line for line in lines), lines


def test_ready_says_loading_until_the_models_load(models):
    def slow_load():
        time.sleep(0.5)
        return models

    with TestClient(build_app(slow_load, ServeOptions(access_log=None))) as c:
        assert c.get("/health").status_code == 200
        assert_error(c.get("/ready"), 503, code="loading")
        assert_error(c.post(GEN, json={"model": "digits", "prompt": "1"}), 503, code="loading")
        wait_for(lambda: c.get("/ready").status_code == 200, 10)
        assert (
            c.post(GEN, json={"model": "digits", "prompt": "1", "num_inference_steps": 2}).status_code == 200
        )


@pytest.mark.slow
def test_a_folder_that_fails_to_load_ends_the_server_with_one_line(engine_copy):
    onnx = next(engine_copy.rglob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes() + b"damaged")  # the check at load fails, in the background
    r = subprocess.run(
        [sys.executable, "-m", "ditrt.serve.cli", str(engine_copy), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: ") and "model.onnx" in last, r.stderr


@pytest.mark.slow
def test_two_workers_run_two_requests_at_once(models):
    body = {"model": "digits", "prompt": "1", "n": 3, "num_inference_steps": 300}
    with client(models, concurrency=2, max_batch=1) as c:
        threads = [in_thread(c.post, GEN, json={**body, "seed": s}) for s in (1, 2)]
        wait_for(lambda: metric(c.get("/metrics").text, "ditrt_in_flight", model="digits") == 2)
        for thread, out in threads:
            thread.join(60)
            assert out["r"].status_code == 200 and len(out["r"].json()["data"]) == 3
        assert metric(c.get("/metrics").text, "ditrt_in_flight", model="digits") == 0
