"""dit-serve on Ray Serve: one replica = one whole dit-serve (its engines, its workers, on its own GPU).

Every replica builds the same Starlette app as the dit-serve command, build_app(load_models(...)), inside its
own process, so the engines open on the replica's device and nothing large travels from the driver; Serve's
proxy spreads HTTP requests over the replicas (server-sent events stream through it), and the controller
replaces a replica that dies or fails its health check (the app's /ready: workers alive, not shutting down).

    serve run ditrt.serve.ray_app:build folders=/engines/a,td=/engines/b num_replicas=2
    serve run ditrt.serve.ray_app:build folders=/engines/a min_replicas=1 max_replicas=4   # autoscaling

or from Python: serve.run(deployment(["/engines/a"], num_replicas=2), route_prefix="/").
Responses carry `x-ditrt-replica` (which replica answered). Engine folders must be at one path on every node.
Serve's own errors (a replica that died mid-request, a full proxy queue) come in OpenAI's error shape too when
the proxy runs OpenAIErrorMiddleware: set
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=ditrt.serve.ray_app:proxy_middlewares
where the proxies start (the environment of `serve run`, or of `ray start` on each node; Serve 2.60 took
middlewares out of http_options).
Per replica, like one dit-serve: DELETE /v1/images/generations/{id} finds only requests running on the replica
that receives it, and /metrics shows the replica that answers.
"""

import asyncio
import json
import sys
from collections.abc import Sequence

from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.middleware import Middleware

from ditrt.runtime.errors import InputError

# ditrt.serve.app is imported where used: Serve's proxy imports this module only for OpenAIErrorMiddleware

# name -> (kind, lo, hi): the numeric arguments of deployment() and build(); the ServeOptions ranges are the
# dit-serve command's own (serve/cli.py)
NUMBERS = {
    "num_replicas": (int, 1, 1024),
    "num_gpus": (float, 0, 64),
    "num_cpus": (float, 0, 1024),
    "max_ongoing_requests": (int, 1, 100_000),
    "max_queued_requests": (int, -1, 100_000),
    "min_replicas": (int, 0, 1024),
    "max_replicas": (int, 1, 1024),
    "target_ongoing_requests": (float, 0.1, 100_000),
    "threads": (int, 1, 1024),
    "queue_size": (int, 0, 10_000),
    "timeout_s": (float, 0.1, 86_400),
    "concurrency": (int, 1, 64),
    "max_batch": (int, 1, 64),
    "max_body_bytes": (int, 1024, 1 << 30),
    "shutdown_timeout_s": (float, 0, 3600),
}
SERVE_OPTIONS = (
    "queue_size",
    "timeout_s",
    "concurrency",
    "max_batch",
    "max_body_bytes",
    "shutdown_timeout_s",
)
TEXTS = ("folders", "backend", "verify", "api_key_file", "access_log", "cors_origins", "name")
NO_ANSWER = "Ray Serve: the request failed before an answer (e.g. its replica died); retry it"
RETRY_AFTER_S = 1  # Retry-After of Serve's own 429 (every replica full and the proxy's queue too)


@serve.ingress()  # no app here: __serve_build_asgi_app__ builds it in the replica (Serve runs its lifespan)
class DitServe:
    """One replica: the dit-serve app over the engine folders (arguments: see deployment())."""

    def __init__(self, folders: list[str], load: dict, options: dict, api_key_file, access_log: str):
        self.folders, self.load, self.options = folders, load, options
        self.api_key_file, self.access_log = api_key_file, access_log

    async def __serve_build_asgi_app__(self):
        from ditrt.serve.app import ServeOptions, build_app, load_models
        from ditrt.serve.cli import open_log, read_keys

        keys = read_keys(self.api_key_file) if self.api_key_file else ()
        self.log = open_log(self.access_log)  # "-": stderr, i.e. the replica's log file under /tmp/ray
        # a thread: the replica's event loop keeps answering Serve's control calls while the engines load
        self.models = await asyncio.to_thread(load_models, self.folders, **self.load)
        app = build_app(self.models, ServeOptions(**self.options, api_keys=keys, access_log=self.log))
        self.service = app.state.service
        return Tagged(app, serve.get_replica_context().replica_id.unique_id)

    async def check_health(self) -> None:
        """Raising marks the replica unhealthy: Serve stops routing to it and starts another."""
        problem = self.service.problem()  # what /ready answers, without an access-log line every 10 s
        if problem is not None:
            raise RuntimeError(problem.message)

    def __del__(self):  # Serve has run the app's lifespan shutdown (workers stopped) before this
        for pipe in getattr(self, "models", {}).values():
            pipe.close()
        if getattr(self, "log", None) not in (None, sys.stderr):
            self.log.close()


class Tagged:
    """ASGI wrapper of a replica's app: every response names the replica (x-ditrt-replica), and the app's
    x-request-id is dropped where it repeats the request's, since Serve's proxy adds that header itself (the
    proxy gives every request an id, so the app's id is the proxy's)."""

    def __init__(self, app, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = next((v for k, v in scope["headers"] if k.lower() == b"x-request-id"), None)

        async def send_tagged(message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", []) if (k.lower(), v) != (b"x-request-id", rid)
                ]
                message = {**message, "headers": [*headers, (b"x-ditrt-replica", self.replica)]}
            await send(message)

        await self.app(scope, receive, send_tagged)


class OpenAIErrorMiddleware:
    """For Serve's proxy: the errors Serve answers itself (plain text: a full queue, a timeout) rewritten in
    OpenAI's error shape, and a 500 in that shape where Serve answers nothing (a replica that died
    mid-request: uvicorn would send a plain-text 500); the app's own answers pass untouched."""

    CODES = {404: "not_found", 408: "timeout", 429: "queue_full", 500: "internal_error", 503: "unavailable"}

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held, body, started = None, b"", False

        async def send_shaped(message) -> None:
            nonlocal held, body, started
            if message["type"] == "http.response.start":
                started = True
                kind = dict(message.get("headers", [])).get(b"content-type", b"")
                if message["status"] >= 400 and not kind.startswith(
                    (b"application/json", b"text/event-stream")
                ):
                    held = message  # hold it until the body is known
                    return
            if held is None or message["type"] != "http.response.body":
                return await send(message)
            body += message.get("body", b"")
            if not message.get("more_body"):
                text = body.decode("utf-8", "replace").strip()[:500] or str(held["status"])
                await self.answer(send, held["status"], f"Ray Serve: {text}", held.get("headers", []))

        try:
            await self.app(scope, receive, send_shaped)
        except Exception:
            if not started:
                await self.answer(send, 500, NO_ANSWER)
            raise
        if not started:
            await self.answer(send, 500, NO_ANSWER)

    async def answer(self, send, status: int, message: str, headers=()) -> None:
        kind = (
            "rate_limit_error"
            if status == 429
            else "server_error"
            if status >= 500
            else "invalid_request_error"
        )
        error = {"message": message, "type": kind, "param": None, "code": self.CODES.get(status)}
        shaped = json.dumps({"error": error}).encode()
        keep = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-length")]
        headers = [
            *keep,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(shaped)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": shaped})


def proxy_middlewares() -> list:
    """For RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=ditrt.serve.ray_app:proxy_middlewares."""
    return [Middleware(OpenAIErrorMiddleware)]


def deployment(
    folders: Sequence[str] | str,
    *,
    num_replicas: int | None = None,
    num_gpus: float | None = None,
    num_cpus: float = 1,
    max_ongoing_requests: int | None = None,
    max_queued_requests: int | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    target_ongoing_requests: float | None = None,
    backend: str = "onnxruntime",
    threads: int | None = None,
    verify: bool = True,
    api_key_file: str | None = None,
    access_log: str = "-",
    cors_origins: Sequence[str] = (),
    name: str = "dit-serve",
    **serve_options,
) -> serve.Application:
    """A bound Serve application of dit-serve replicas over the engine folders (each FOLDER or NAME=FOLDER).

    num_replicas: fixed replica count (default 1); or autoscaling between min_replicas (default 1; 0 scales to
        zero, the next request then waits for the engines to load) and max_replicas, aiming at
        target_ongoing_requests per replica (default: concurrency, i.e. every worker busy and none waiting).
    num_gpus: GPUs per replica; default 1 when the folders hold engines only a GPU runs (TensorRT plans,
        AOTInductor packages compiled for CUDA), else 0 (ONNX: the CPU onnxruntime; onnxruntime-gpu: pass 1).
    num_cpus: CPUs Ray reserves per replica (default 1); CPU replicas' engines use that many threads unless
        threads is given (GPU replicas: the backend's default).
    max_ongoing_requests: requests a replica holds at once (default concurrency + queue_size: what one model's
        worker admits, so the app's own queue orders them); beyond, the proxy queues up to max_queued_requests
        (default queue_size; -1 unbounded) and answers 429 with Retry-After past that.
    backend, threads, verify: as load_models; api_key_file (read on each replica: the keys never travel
        through Ray), access_log ("-" the replica's stderr log, "off", or a file on each node) and
        cors_origins, with serve_options (queue_size, timeout_s, concurrency, max_batch, max_body_bytes,
        shutdown_timeout_s): as the dit-serve command's options.
    """
    import click

    from ditrt.serve.app import ServeOptions
    from ditrt.serve.cli import read_keys

    folders = [folders] if isinstance(folders, str) else list(folders)
    if not folders or not all(isinstance(f, str) and f for f in folders):
        raise InputError(f"folders {folders!r} is not allowed; give engine folders (FOLDER or NAME=FOLDER)")
    for key in serve_options:
        if key not in SERVE_OPTIONS:
            raise InputError(f"unknown argument {key!r}; dit-serve options are {', '.join(SERVE_OPTIONS)}")
    n = dict(
        num_replicas=num_replicas,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        target_ongoing_requests=target_ongoing_requests,
        threads=threads,
        **serve_options,
    )
    n = {k: None if v is None else number(k, v) for k, v in n.items()}
    options = {k: n[k] for k in SERVE_OPTIONS if n.get(k) is not None}
    defaults = ServeOptions(**options)
    if not isinstance(access_log, str) or not access_log:
        raise InputError(f"access_log {access_log!r} is not allowed; use -, off or a file path")
    if isinstance(cors_origins, str) or not all(isinstance(o, str) for o in cors_origins):
        raise InputError(f"cors_origins {cors_origins!r} is not allowed; give a list of origins")
    if api_key_file is not None:
        try:
            read_keys(api_key_file)  # here too: a bad file fails now, not in every replica
        except click.ClickException as e:
            raise InputError(e.message.replace("--api-key-file", "api_key_file")) from None
    count = replicas(n, defaults)
    if n["num_gpus"] is None:
        n["num_gpus"] = 1.0 if needs_gpu(folders) else 0.0
    if n["threads"] is None and n["num_gpus"] == 0:
        n["threads"] = max(1, int(n["num_cpus"]))  # the cores Ray reserved for the replica, no more
    load = dict(backend=backend, threads=n["threads"], verify=bool(verify))
    options["cors_origins"] = tuple(cors_origins)
    queued = defaults.queue_size if n["max_queued_requests"] is None else n["max_queued_requests"]
    return (
        serve.deployment(DitServe, name=name)
        .options(
            ray_actor_options={"num_cpus": n["num_cpus"], "num_gpus": n["num_gpus"]},
            max_ongoing_requests=n["max_ongoing_requests"] or defaults.concurrency + defaults.queue_size,
            max_queued_requests=queued,
            backpressure_config=BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S),
            # Serve waits this long for running requests, then runs the app's shutdown (which waits its own)
            graceful_shutdown_timeout_s=defaults.shutdown_timeout_s,
            **count,
        )
        .bind(folders, load, options, api_key_file, access_log)
    )


def replicas(n: dict, defaults) -> dict:
    """The replica count as Serve's options: num_replicas (fixed), or an autoscaling_config."""
    if n["min_replicas"] is not None and n["max_replicas"] is None:
        raise InputError("min_replicas needs max_replicas (autoscaling); or give num_replicas")
    if n["max_replicas"] is not None and n["num_replicas"] is not None:
        raise InputError("give either num_replicas (fixed) or max_replicas (autoscaling), not both")
    if n["max_replicas"] is None:
        return {"num_replicas": n["num_replicas"] or 1}
    lo = 1 if n["min_replicas"] is None else n["min_replicas"]
    if lo > n["max_replicas"]:
        raise InputError(f"min_replicas {lo} is over max_replicas {n['max_replicas']}")
    target = n["target_ongoing_requests"] or float(defaults.concurrency)
    return {
        "autoscaling_config": dict(
            min_replicas=lo, max_replicas=n["max_replicas"], target_ongoing_requests=target
        )
    }


def build(args: dict) -> serve.Application:
    """`serve run ditrt.serve.ray_app:build folders=A,NAME=B key=value...`: deployment()'s arguments as text
    (folders and cors_origins comma-separated; verify true/false)."""
    args = dict(args)
    for key in args:
        if key not in NUMBERS and key not in TEXTS:
            raise InputError(f"unknown argument {key!r}; use {', '.join([*TEXTS, *NUMBERS])}")
    if "folders" not in args:
        raise InputError("folders is required: folders=/path/a,NAME=/path/b")
    folders = args.pop("folders")
    if "cors_origins" in args:
        args["cors_origins"] = [o.strip() for o in str(args["cors_origins"]).split(",") if o.strip()]
    if "verify" in args:
        verify = str(args["verify"]).lower()
        if verify not in ("true", "false", "1", "0"):
            raise InputError(f"verify {args['verify']!r} is not allowed; use true or false")
        args["verify"] = verify in ("true", "1")
    folders = [s.strip() for s in folders.split(",") if s.strip()] if isinstance(folders, str) else folders
    return deployment(folders, **args)


def number(name: str, value):
    """A numeric argument (int, float, or its text) checked against NUMBERS, or a one-line InputError."""
    kind, lo, hi = NUMBERS[name]
    try:
        v = kind(value) if isinstance(value, str) else value
    except ValueError:
        v = None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or isinstance(v, int))
    if not ok or not lo <= v <= hi:
        what = "an integer" if kind is int else "a number"
        raise InputError(f"{name} {value!r} is not allowed; use {what} in {lo}..{hi}")
    return kind(v)


def needs_gpu(folders: list[str]) -> bool:
    """Whether an engine of these folders runs only on a GPU (from their manifests, read in the driver)."""
    from ditrt.runtime import load_manifest
    from ditrt.serve.app import parse_spec

    for spec in folders:
        try:
            manifest = load_manifest(parse_spec(spec)[1], verify=False)
        except Exception as e:
            raise InputError(f"cannot read the engine folder {spec!r} here ({e}); pass num_gpus") from None
        for c in manifest.components.values():
            if c.backend == "tensorrt" or (c.target is not None and c.target.device == "cuda"):
                return True
    return False
