"""dit-serve's HTTP app: OpenAI's image API over loaded engine folders (README: "dit-serve").

Routes: POST /v1/images/generations (JSON, or server-sent events with `stream`), DELETE
/v1/images/generations/{request_id}, GET /v1/models, GET /health, /ready, /metrics, and / (the playground).
Every error is OpenAI's {"error": {message, type, param, code}}: 400 a body that is not a valid request (JSON,
types, unknown fields, OpenAI's enums and ranges); 422 a valid request this model cannot run (a size it does not
make, steps or a class out of its range: the checks of dit-run); 401 a missing or wrong API key; 404, 405, 409 (a
request id in use), 413 (body too large), 415 (not JSON), 429 (queue full, with Retry-After), 499 (cancelled: the
client went or the request was deleted), 503 (not ready, shutting down), 504 (past the request timeout).
"""

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import re
import secrets
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

import anyio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ditrt.runtime import DitError, InputError, Pipeline
from ditrt.runtime.pipeline import MAX_STEPS

from .worker import Cancelled, Closed, Job, ModelWorker, QueueFull

disable_created_metrics()  # no *_created series: scrapers do not need them
PLAYGROUND = Path(__file__).with_name("playground.html")
MAX_IMAGES = 10  # OpenAI's n
MAX_PARTIAL_IMAGES = 3  # OpenAI's partial_images
MAX_PROMPT = 32000  # characters, as OpenAI's GPT image models
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# body fields -> JSON types allowed (null is always allowed: the default); OpenAI's, then our extensions
FIELDS = {
    "prompt": str,
    "model": str,
    "n": int,
    "size": str,
    "response_format": str,
    "output_format": str,
    "output_compression": int,
    "user": str,
    "stream": bool,
    "partial_images": int,
    "quality": str,
    "background": str,
    "moderation": str,
    "style": str,
    "negative_prompt": str,
    "num_inference_steps": int,
    "guidance_scale": (int, float),
    "seed": int,
    "sampler": str,
    "class_label": (int, str),
    "shift": (int, float),
    "max_sequence_length": int,
}
# names other image APIs use -> ours (named in the error, never accepted silently)
ALIAS = {
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "cfg_scale": "guidance_scale",
    "width": "size",
    "height": "size",
    "batch_size": "n",
    "class": "class_label",
}
KIND = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
# OpenAI options with one meaning here: the values accepted (anything else is refused, not ignored)
ONE_WAY = {
    "response_format": ("b64_json",),
    "quality": ("auto", "standard"),
    "background": ("auto", "opaque"),
    "moderation": ("auto", "low"),  # no moderation is done: "low" is as strict as it gets here
}
# the Pipeline's words for a value (its messages start with them) -> the API's field
API_FIELD = {
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "class label": "class_label",
    "batch_size": "n",
    "size": "size",
    "sampler": "sampler",
    "seed": "seed",
    "shift": "shift",
    "max_sequence_length": "max_sequence_length",
    "negative_prompt": "negative_prompt",
    "prompt": "prompt",
}
# other Pipeline messages -> the field they are about (the message names the value itself)
PARAM_OF = {"width ": "size", "height ": "size", "unknown sampler": "sampler"}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class ServeOptions:
    queue_size: int = 16  # requests per model that may wait beyond the ones running
    timeout_s: float = 300.0  # per request, queue included
    api_keys: tuple[str, ...] = ()  # Bearer keys accepted on /v1/*; none: no authentication
    max_body_bytes: int = 1 << 20
    cors_origins: tuple[str, ...] = ()  # none: no CORS headers (browsers allow same-origin only)
    concurrency: int = 1  # worker threads (engine calls at once) per model
    max_batch: int = 4  # images per engine call; a larger n is split into turns (see worker.py)
    shutdown_timeout_s: float = (
        30.0  # at shutdown, admitted requests may finish this long, then are cancelled
    )
    access_log: IO[str] | None = sys.stderr  # JSON lines; None: no access log


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    TYPES = {401: "authentication_error", 429: "rate_limit_error", 499: "cancelled", 503: "server_error"}

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, **headers
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {k.replace("_", "-"): str(v) for k, v in self.headers.items()}
        return JSONResponse(self.body(), self.status, headers=headers)


def load_models(
    specs: list[str], backend: str = "onnxruntime", threads: int | None = None, verify: bool = True
) -> dict[str, Pipeline]:
    """Engine folders ("FOLDER" or "NAME=FOLDER") -> {model name: Pipeline}; the name is the manifest's model
    unless given. All or nothing: on an error the pipelines opened so far are closed again."""
    models: dict[str, Pipeline] = {}
    try:
        for spec in specs:
            name, folder = parse_spec(spec)
            pipe = Pipeline.load(folder, backend=backend, threads=threads, verify=verify)
            name = name or pipe.manifest.model
            if name in models:
                pipe.close()
                raise InputError(f"two engine folders are named {name!r}; name one with NAME=FOLDER")
            if not MODEL_NAME.fullmatch(name):
                pipe.close()
                raise InputError(f"model name {name!r} is not allowed; name the folder with NAME=FOLDER")
            models[name] = pipe
    except BaseException:
        for pipe in models.values():
            pipe.close()
        raise
    if not models:
        raise InputError("no engine folders given; name at least one")
    return models


def parse_spec(spec: str) -> tuple[str | None, str]:
    """ "NAME=FOLDER" -> (NAME, FOLDER); "FOLDER" (or one whose part before = is no model name) -> (None, FOLDER)."""
    name, sep, folder = str(spec).partition("=")
    return (name, folder) if sep and MODEL_NAME.fullmatch(name) else (None, str(spec))


def build_app(
    models: dict[str, Pipeline] | Callable[[], dict[str, Pipeline]], options: ServeOptions = ServeOptions()
) -> Starlette:
    """The ASGI app over loaded pipelines, or a function that loads them when the app starts (see Service); it
    does not close them. Its lifespan starts the workers and, at shutdown, lets admitted requests finish within
    options.shutdown_timeout_s before cancelling them."""
    service = Service(models, options)
    middleware = [Middleware(AccessLog, service=service)]
    if options.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(options.cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["*"],  # the OpenAI SDKs send their own x-stainless-* headers
                expose_headers=["x-request-id", "retry-after"],
            )
        )
    app = Starlette(
        routes=[
            Route("/v1/images/generations", service.generations, methods=["POST"]),
            Route("/v1/images/generations/{request_id}", service.delete, methods=["DELETE"]),
            Route("/v1/models", service.list_models, methods=["GET"]),
            Route("/v1/models/{model}", service.get_model, methods=["GET"]),
            Route("/health", service.health, methods=["GET"]),
            Route("/ready", service.ready, methods=["GET"]),
            Route("/metrics", service.metrics_page, methods=["GET"]),
            Route("/", service.playground, methods=["GET"]),
        ],
        middleware=middleware,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=service.lifespan,
    )
    app.state.service = service
    return app


async def http_error(request: Request, e: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    what = f"{request.method} {request.url.path}"
    message = {404: f"no such route: {what}", 405: f"method not allowed: {what}"}.get(e.status_code, e.detail)
    response = ApiError(e.status_code, message[:300], code=code).response()
    response.headers.update(e.headers or {})  # a 405's Allow
    return response


async def internal_error(request: Request, e: Exception) -> Response:
    return ApiError(
        500, f"internal error ({type(e).__name__}); see the server's log", code="internal_error"
    ).response()


class Metrics:
    """Prometheus families, base units (seconds), one registry per app."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "ditrt_requests",
            "Image requests answered, by model and HTTP status",
            ["model", "status"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "ditrt_queue_depth", "Admitted requests with no unit running", ["model"], registry=r
        )
        self.in_flight = Gauge("ditrt_in_flight", "Requests with a unit running", ["model"], registry=r)
        self.stage = Histogram(
            "ditrt_stage_seconds",
            "Seconds per stage: queue per request; text_encode, denoise, decode, encode per engine call",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "ditrt_request_seconds",
            "Seconds from request to response",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("ditrt_images", "Images generated", ["model"], registry=r)
        self.steps = Counter("ditrt_steps", "Denoising steps run", ["model"], registry=r)
        self.cancelled = Counter(
            "ditrt_cancelled", "Requests stopped before done, by reason", ["model", "reason"], registry=r
        )


@dataclass
class Generation:
    """A parsed request: where it goes and how its images are returned."""

    model: str
    args: dict  # Pipeline arguments but seed and batch_size
    n: int
    seed: int
    stream: bool
    partial_images: int
    output_format: str
    compression: int | None
    steps: int
    guidance: float
    sampler: str
    size: str
    user: str | None  # OpenAI's end-user id: logged, for abuse monitoring


class Service:
    """The app's state: models and their workers, metrics, the requests running. `models` may be a function that
    loads them: the server then answers from the start (/health 200, /ready 503 "loading") while they load in a
    thread; a load error is kept in load_error and `stop` (set by the server) is called."""

    def __init__(
        self, models: dict[str, Pipeline] | Callable[[], dict[str, Pipeline]], options: ServeOptions
    ):
        self.options, self.metrics = options, Metrics()
        self.loader, self.models = (models, {}) if callable(models) else (None, models)
        self.workers: dict[str, ModelWorker] = {}
        self.keys = [k.encode() for k in options.api_keys]
        self.running: dict[str, tuple[Job, ModelWorker, str | None]] = {}  # request id -> its job
        self.started = self.draining = False
        self.load_error: BaseException | None = None
        self.stop: Callable[[], None] | None = None  # the server's: called when loading fails
        self.on_ready: Callable[[], None] | None = None  # the server's: called once the models serve

    def attach(self, models: dict[str, Pipeline]) -> None:
        """Start serving the loaded models: a worker each."""
        self.models = models
        for name, pipe in models.items():
            o = self.options
            self.workers[name] = ModelWorker(
                name, pipe, self.metrics, o.concurrency, o.queue_size, o.max_batch
            )
            self.workers[name].start()
        self.started = True
        if self.on_ready is not None:
            self.on_ready()

    async def load(self) -> None:
        try:
            models = await anyio.to_thread.run_sync(self.loader, abandon_on_cancel=True)
            if self.draining:  # stopped while loading: nothing will serve them
                for pipe in models.values():
                    pipe.close()
                return
            self.attach(models)
        except Exception as e:
            self.load_error = e
            if self.stop is not None:
                self.stop()

    def cancel_all(self, reason: str = "shutdown") -> None:
        """Admit nothing more and stop every admitted request at its next step (thread-safe: the server calls it
        from a timer when the shutdown deadline passes, so each request still gets its 503)."""
        self.draining = True
        for worker in list(self.workers.values()):
            worker.cancel_all(reason)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        loading = asyncio.ensure_future(self.load()) if self.loader else self.attach(self.models)
        try:
            yield
        finally:
            self.draining = True
            if loading is not None:
                loading.cancel()
            for worker in self.workers.values():  # in threads: a running unit stops at its next step
                await anyio.to_thread.run_sync(worker.close, self.options.shutdown_timeout_s)

    # --- routes -------------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        problem = self.problem()
        if problem is not None:
            return problem.response()
        return JSONResponse({"status": "ready", "models": list(self.models)})

    def problem(self) -> "ApiError | None":
        """Why the service is not ready (loading, shutting down, a worker gone), or None."""
        if self.draining:
            return ApiError(503, "the server is shutting down", code="shutting_down")
        if not self.started:
            return ApiError(503, "the models are loading", code="loading")
        if not all(w.alive() for w in self.workers.values()):
            return ApiError(503, "a model's worker has stopped", code="not_ready")
        return None

    async def metrics_page(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def playground(self, request: Request) -> Response:
        if not PLAYGROUND.is_file():
            return ApiError(404, "the playground page is not installed", code="not_found").response()
        return FileResponse(PLAYGROUND, media_type="text/html")

    async def list_models(self, request: Request) -> Response:
        try:
            self.authorize(request)
            if not self.started:
                raise ApiError(503, "the server is loading its models", code="loading")
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [self.describe(n, p) for n, p in self.models.items()]})

    async def get_model(self, request: Request) -> Response:
        try:
            self.authorize(request)
            name = self.model_of(request.path_params["model"])
        except ApiError as e:
            return e.response()
        return JSONResponse(self.describe(name, self.models[name]))

    def describe(self, name: str, pipe: Pipeline) -> dict:
        m, (w, h) = pipe.manifest, pipe.image_size
        return {
            "id": name,
            "object": "model",
            "created": int(pipe.folder.joinpath("manifest.json").stat().st_mtime),
            "owned_by": "ditrt",
            "ditrt": {
                "family": m.family,
                "conditioning": m.conditioning,
                "classes": m.class_names if m.conditioning == "class" else None,
                "size": f"{w}x{h}",
                "sizes": [f"{w}x{h}"],
                "samplers": pipe.samplers,
                "default_sampler": m.scheduler.config["_class_name"],
                "default_steps": m.scheduler.default_steps,
                "default_guidance": m.scheduler.default_guidance,
                "max_steps": MAX_STEPS,
                "max_images": MAX_IMAGES,
            },
        }

    async def delete(self, request: Request) -> Response:
        try:
            owner = self.authorize(request)
            rid = request.path_params["request_id"]
            entry = self.running.get(rid)
            if entry is None or entry[2] != owner:
                raise ApiError(404, f"no running request {rid[:64]!r}", "request_id", "not_found")
            entry[1].cancel(entry[0], "deleted")
            return JSONResponse({"id": rid, "object": "image.generation", "cancelled": True})
        except ApiError as e:
            return e.response()

    async def generations(self, request: Request) -> Response:
        log = request.state.log = {}
        try:
            owner = self.authorize(request)
            if self.draining or not self.started:
                why = "is shutting down" if self.draining else "is loading its models"
                raise ApiError(503, f"the server {why}", code="shutting_down" if self.draining else "loading")
            rid = request.headers.get("x-request-id") or uuid.uuid4().hex
            if not REQUEST_ID.fullmatch(rid):
                raise ApiError(400, "X-Request-Id must be 1..64 of A-Z a-z 0-9 . _ -", "x-request-id")
            gen = self.parse(await read_body(request, self.options.max_body_bytes), log)
            log.update(images=gen.n, stream=gen.stream, user=gen.user)
            if rid in self.running:
                raise ApiError(409, f"request id {rid!r} is in use by a running request", "x-request-id")
            log["request_id"] = rid
            return await self.submit(request, gen, rid, owner)
        except ApiError as e:
            log["status"] = e.status
            return e.response()

    # --- the work -----------------------------------------------------------------------------------------

    async def submit(self, request: Request, gen: Generation, rid: str, owner: str | None) -> Response:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def sink(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed (shutdown): nobody is waiting any more
                pass

        steps, n = gen.steps, gen.partial_images
        previews = sorted({max(1, round(steps * (i + 1) / (n + 1))) for i in range(n)} - {steps})
        job = Job(
            gen.args,
            gen.n,
            gen.seed,
            tuple(previews),
            time.monotonic() + self.options.timeout_s,
            sink,
            lambda image, params: encode(image, params, gen.output_format, gen.compression),
        )
        worker = self.workers[gen.model]
        try:
            worker.submit(job)
        except QueueFull as e:
            raise ApiError(
                429,
                f"model {gen.model!r} has {self.options.queue_size} requests waiting; retry after {e.retry_after} s",
                code="queue_full",
                retry_after=e.retry_after,
            ) from None
        except Closed:
            raise ApiError(503, "the server is shutting down", code="shutting_down") from None
        self.running[rid] = (job, worker, owner)
        headers = {"x-request-id": rid}
        if gen.stream:
            return EventStream(self.stream(job, worker, gen, rid, events, request), headers=headers)
        try:
            images = await self.collect(job, worker, events, request)
        finally:
            self.running.pop(rid, None)
        body = {
            "created": int(time.time()),
            "data": [{"b64_json": b} for b in images],
            "output_format": gen.output_format,
            "size": gen.size,
            "quality": "auto",
            "background": "opaque",
            "ditrt": self.summary(job, gen, rid),
        }
        return JSONResponse(body, headers=headers)

    async def collect(
        self, job: Job, worker: ModelWorker, events: asyncio.Queue, request: Request
    ) -> list[str]:
        """The request's images; cancels it if the client goes or the timeout passes first."""
        images = [None] * job.n

        async def until_done() -> None:
            while True:
                event = await events.get()
                if event[0] == "image":
                    images[event[1]] = event[2]
                elif event[0] == "done":
                    return
                elif event[0] == "error":
                    raise error_of(event[1], self.options.timeout_s)

        done, gone = asyncio.ensure_future(until_done()), asyncio.ensure_future(disconnected(request))
        try:
            finished, _ = await asyncio.wait(
                {done, gone},
                timeout=max(0.0, job.deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if done not in finished:
                worker.cancel(job, "client" if gone in finished else "timeout")
            await done  # after a cancel: the Cancelled error, within a step
        except asyncio.CancelledError:  # the server cancels its requests at the end of a graceful shutdown
            worker.cancel(job, "shutdown")
            raise
        finally:
            gone.cancel()
            done.cancel()
        return images

    async def stream(self, job, worker, gen: Generation, rid: str, events: asyncio.Queue, request: Request):
        """Server-sent events as OpenAI's: partial images, then one completed event per image."""
        common = {
            "created_at": int(time.time()),
            "size": gen.size,
            "quality": "auto",
            "background": "opaque",
            "output_format": gen.output_format,
        }
        log, over = request.state.log, False
        try:
            while True:
                try:
                    event = await asyncio.wait_for(
                        events.get(), max(0.0, job.deadline - time.monotonic()) + 0.5
                    )
                except asyncio.TimeoutError:
                    worker.cancel(job, "timeout")
                    continue
                if event[0] == "preview":
                    _, image, index, b64 = event
                    data = {"type": "image_generation.partial_image", "b64_json": b64, **common}
                    yield sse(data | {"partial_image_index": index, "image_index": image})
                elif event[0] == "image":
                    _, image, b64 = event
                    data = {
                        "type": "image_generation.completed",
                        "b64_json": b64,
                        **common,
                        "image_index": image,
                    }
                    yield sse(data | {"ditrt": self.summary(job, gen, rid, image)})
                else:
                    over = True
                    if event[0] == "error":
                        e = error_of(event[1], self.options.timeout_s)
                        log["status"] = e.status
                        yield sse({"type": "error", **e.body()})
                    return
        finally:
            self.running.pop(rid, None)
            if not over:  # the client went (the stream was cancelled) or the server stops
                log["status"] = 499
                worker.cancel(job, "client")

    def summary(self, job: Job, gen: Generation, rid: str, image: int | None = None) -> dict:
        seeds = [gen.seed + i for i in range(gen.n)] if image is None else [gen.seed + image]
        params = [job.parameters.get(i) for i in (range(gen.n) if image is None else [image])]
        return {
            "request_id": rid,
            "model": gen.model,
            "seeds": seeds,
            "steps": gen.steps,
            "guidance": gen.guidance,
            "sampler": gen.sampler,
            "parameters": params,
            "warnings": list(job.warnings),
            "timings_ms": {k: round(v, 3) for k, v in job.timings_ms.items()},
        }

    # --- checks -------------------------------------------------------------------------------------------

    def authorize(self, request: Request) -> str | None:
        """With API keys configured: the Bearer key must be one of them (constant-time compare against each)
        -> a digest of the key, which owns the requests it starts; None without keys."""
        if not self.keys:
            return None
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        given = key.strip().encode("latin-1")  # the header's bytes (Starlette decodes them as latin-1)
        ok = False
        for k in self.keys:
            ok |= hmac.compare_digest(given, k)
        if scheme.lower() != "bearer" or not ok:
            raise ApiError(
                401, "missing or wrong API key; send Authorization: Bearer <key>", code="invalid_api_key"
            )
        return hashlib.sha256(given).hexdigest()

    def parse(self, body: bytes, log: dict) -> Generation:
        """A request body -> a Generation the model can run, or ApiError 400/404/422."""
        fields = parse_json(body)
        for name, value in fields.items():
            kinds = FIELDS.get(name)
            if kinds is None:
                hint = f"; this API calls it {ALIAS[name]}" if name in ALIAS else ""
                raise ApiError(400, f"unknown parameter {name[:64]!r}{hint}", name[:64], "unknown_parameter")
            if value is not None and (
                not isinstance(value, kinds) or (value is True or value is False) != (kinds is bool)
            ):
                kind = " or ".join(KIND[k] for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
                raise ApiError(400, f"{name} {show(value)} is not allowed; give {kind}", name, "invalid_type")
        get = fields.get
        for name, allowed in ONE_WAY.items():
            if get(name) is not None and get(name) not in allowed:
                why = (
                    "this server returns images inline" if name == "response_format" else "it is not offered"
                )
                raise ApiError(
                    400,
                    f"{name} {show(get(name))} is not supported ({why}); use {' or '.join(allowed)}",
                    name,
                )
        if get("style") is not None:
            raise ApiError(400, "style is not supported by these models; leave it out", "style")
        model = log["model"] = self.model_of(get("model"))
        pipe = self.models[model]
        n = in_range("n", 1 if get("n") is None else get("n"), 1, MAX_IMAGES)
        stream = bool(get("stream"))
        partial = in_range("partial_images", get("partial_images") or 0, 0, MAX_PARTIAL_IMAGES)
        if partial and not stream:
            raise ApiError(400, "partial_images needs stream: true", "partial_images")
        output_format = get("output_format") or "png"
        if output_format not in FORMATS:
            raise ApiError(
                400,
                f"output_format {show(output_format)} is not allowed; use png, jpeg or webp",
                "output_format",
            )
        compression = get("output_compression")
        if compression is not None:
            in_range("output_compression", compression, 0, 100)
            if output_format == "png":
                raise ApiError(
                    400, "output_compression applies to jpeg and webp, not png", "output_compression"
                )
        for name in ("prompt", "negative_prompt"):
            if get(name) is not None and len(get(name)) > MAX_PROMPT:
                raise ApiError(400, f"{name} is {len(get(name))} characters; at most {MAX_PROMPT}", name)
        args = dict(
            steps=get("num_inference_steps"),
            guidance=get("guidance_scale"),
            sampler=get("sampler"),
            shift=get("shift"),
            max_sequence_length=get("max_sequence_length"),
            **self.conditioning(pipe, get("prompt"), get("negative_prompt"), get("class_label")),
            **size_of(pipe, get("size")),
        )
        seed = get("seed")
        seed = secrets.randbelow(2**31) if seed is None or seed < 0 else seed
        try:
            pipe.check(**args, seed=seed, batch_size=n)
        except InputError as e:
            raise unprocessable(str(e)) from None
        sched = pipe.manifest.scheduler
        w, h = args.get("width") or pipe.image_size[0], args.get("height") or pipe.image_size[1]
        return Generation(
            model,
            args,
            n,
            seed,
            stream,
            partial,
            output_format,
            compression,
            sched.default_steps if args["steps"] is None else args["steps"],
            float(sched.default_guidance if args["guidance"] is None else args["guidance"]),
            pipe.scheduler_config(args["sampler"], args["shift"])["_class_name"],
            f"{w}x{h}",
            None if get("user") is None else get("user")[:256],
        )

    def model_of(self, model: str | None) -> str:
        if model is None:
            if len(self.models) == 1:
                return next(iter(self.models))
            raise ApiError(
                400, f"model is required: one of {', '.join(self.models)}", "model", "missing_model"
            )
        if model not in self.models:
            raise ApiError(
                404,
                f"model {model[:128]!r} is not served here; use one of {', '.join(self.models)}",
                "model",
                "model_not_found",
            )
        return model

    @staticmethod
    def conditioning(pipe: Pipeline, prompt, negative_prompt, class_label) -> dict:
        """A class-conditional model takes class_label, or the prompt read as one ("7", "cat"), since OpenAI's
        clients always send a prompt; a text model takes the prompt."""
        if pipe.manifest.conditioning != "class":
            if prompt is None:
                raise ApiError(400, "prompt is required", "prompt", "missing_prompt")
            return {"prompt": prompt, "negative_prompt": negative_prompt, "class_label": class_label}
        if isinstance(class_label, str) and re.fullmatch(r"-?[0-9]{1,9}", class_label.strip()):
            class_label = int(class_label)  # "7" is class 7, as dit-run reads --class-label
        if class_label is None:
            if prompt is None or not prompt.strip():
                raise ApiError(
                    400, "give the class as class_label or as the prompt", "class_label", "missing_class"
                )
            class_label = prompt.strip()
            class_label = int(class_label) if re.fullmatch(r"-?[0-9]{1,9}", class_label) else class_label
        elif (
            prompt
            and prompt.strip() not in (str(class_label), "")
            and not (re.fullmatch(r"-?[0-9]{1,9}", prompt.strip()) and int(prompt) == class_label)
        ):
            raise ApiError(
                400,
                f"model {pipe.manifest.model!r} is class-conditional and class_label is given: leave the prompt "
                "empty (or the same class)",
                "prompt",
            )
        return {"negative_prompt": negative_prompt, "class_label": class_label}


class EventStream(StreamingResponse):
    """Server-sent events whose generation stops as soon as the client goes: the disconnect is listened for
    beside the stream whatever the server's ASGI version (from 2.4 Starlette notices it only at its next
    write, which may be many steps away)."""

    media_type = "text/event-stream"

    def __init__(self, content, headers: dict):
        super().__init__(content, headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers})

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as tasks:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass
                tasks.cancel_scope.cancel()

            tasks.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tasks.cancel_scope.cancel()


class AccessLog:
    """Pure ASGI middleware: one JSON line per HTTP request (method, path, status, seconds, client, and the
    request's model, images and id), and the request metrics of the image routes."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        scope.setdefault("state", {})

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            fields = getattr(scope["state"].get("log"), "copy", dict)()
            code = fields.pop("status", status[0])
            if scope["path"].startswith("/v1/images/generations") and scope["method"] == "POST":
                model = fields.get("model", "")
                self.service.metrics.requests.labels(model, str(code)).inc()
                if model:
                    self.service.metrics.latency.labels(model).observe(seconds)
            if self.service.options.access_log is not None:
                client = scope.get("client") or ("", 0)
                line = {
                    "time": round(time.time(), 3),
                    "client": client[0],
                    "method": scope["method"],
                    "path": scope["path"][:256],
                    "status": code,
                    "seconds": round(seconds, 6),
                    **fields,
                }
                try:
                    print(json.dumps(line), file=self.service.options.access_log, flush=True)
                except (OSError, ValueError):  # a closed or full log must not fail requests
                    pass


async def read_body(request: Request, limit: int) -> bytes:
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(
            415,
            f"content type {kind[:64]!r} is not allowed; send application/json",
            code="unsupported_media_type",
        )
    length = request.headers.get("content-length")
    if length is not None and re.fullmatch(r"[0-9]{1,18}", length) and int(length) > limit:
        raise ApiError(
            413, f"request body of {length} bytes is over the limit of {limit}", code="request_too_large"
        )
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(
                    413, f"request body is over the limit of {limit} bytes", code="request_too_large"
                )
    except ClientDisconnect:  # gone while sending: nobody reads the answer, the log says 499
        raise ApiError(499, "the client went before its request was sent", code="cancelled") from None
    return bytes(body)


def parse_json(body: bytes) -> dict:
    def constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        fields = json.loads(body.decode("utf-8"), parse_constant=constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        why = str(e).splitlines()[0][:120] if not isinstance(e, RecursionError) else "nested too deeply"
        raise ApiError(400, f"the body is not valid JSON ({why})", code="invalid_json") from None
    if not isinstance(fields, dict):
        raise ApiError(400, "the body must be a JSON object of request fields", code="invalid_json")
    return fields


def size_of(pipe: Pipeline, size: str | None) -> dict:
    if size is None or size == "auto":
        return {}
    match = SIZE.fullmatch(size)
    if not match:
        w, h = pipe.image_size
        raise ApiError(
            400, f"size {show(size)} is not allowed; give WIDTHxHEIGHT (e.g. {w}x{h}) or auto", "size"
        )
    return {"width": int(match[1]), "height": int(match[2])}


def in_range(name: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} {show(value)} is not allowed; use an integer in {lo}..{hi}", name)
    return value


def unprocessable(message: str) -> ApiError:
    """A Pipeline's InputError as the API says it: its value named by the API's field."""
    for word, field in API_FIELD.items():
        if message.startswith(word + " "):
            return ApiError(422, field + message[len(word) :], field, "unsupported_value")
    field = next((f for w, f in PARAM_OF.items() if message.startswith(w)), None)
    return ApiError(422, message, field, "unsupported_value")


def error_of(e: Exception, timeout_s: float) -> ApiError:
    """What a request that failed in the worker answers."""
    if isinstance(e, Cancelled):
        if e.reason == "timeout":
            return ApiError(
                504, f"the request took longer than the server's timeout of {timeout_s:g} s", code="timeout"
            )
        if e.reason == "shutdown":
            return ApiError(503, "the server shut down before the request was done", code="shutting_down")
        return ApiError(499, f"the request was cancelled ({e.reason})", code="cancelled")
    if isinstance(e, DitError):
        return unprocessable(str(e))
    traceback.print_exception(e, file=sys.stderr)
    return ApiError(500, f"internal error ({type(e).__name__}); see the server's log", code="internal_error")


async def disconnected(request: Request) -> None:
    """Returns when the client has gone (after the body was read, the server's next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def encode(image, parameters: str | None, output_format: str, compression: int | None) -> str:
    """An 8-bit image as base64 of a PNG (with the A1111 parameters chunk, as dit-run writes), JPEG or WebP."""
    from PIL import Image, PngImagePlugin

    picture, buffer = Image.fromarray(image), io.BytesIO()
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        if parameters is not None:
            info.add_text("parameters", parameters)
        picture.save(buffer, format="PNG", pnginfo=info)
    else:
        quality = 100 if compression is None else compression
        picture.convert("RGB").save(buffer, format=FORMATS[output_format], quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def sse(data: dict) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
