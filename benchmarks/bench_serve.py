"""Load and fault benchmark of dit-serve over loopback: throughput, latency, 429s, lost requests, memory,
determinism, streaming, cancellation, batching and shutdown, against `dit-serve` subprocesses: one with the
settings given, one alike but for --max-batch (the other of 1 and 4, for the batching question), started together.

    python benchmarks/bench_serve.py [--model-folder engines/digits] [--quick] [--json PATH]

Without --model-folder the built-in digits demo is exported to a temp folder (`dit-export digits -o DIR`).
The server listens on 127.0.0.1 at a free port; nothing else is contacted. Every phase is bounded by its
duration and a request count, and the whole run by --budget-s (phases left without time are skipped, with
a note). Phases ((d)-(f) run first, after 3 warm-up requests):
  (a) closed loop, 1 client and C = concurrency + queue-size clients: the sustainable rate R (requests/s);
  (b) open loop, Poisson arrivals at 1x, 2x, 4x R for --duration-s each: completed/s, p50/p95/p99 of the
      200s, 429s (and whether each carried Retry-After), other statuses, and requests without any HTTP answer
      (lost: must be 0), split into connect errors, timeouts and connections closed without an answer;
  (c) the server's RSS (/proc/PID/status VmRSS; VmHWM = peak) at ready, after warm-up and at the end;
  (d) determinism: one request set sent serially, then all at once: the same image per seed;
  (e) a streamed request (partial_images 3): time to the first partial image against the total;
  (f) cancellation: a long request (many steps, several engine calls) dropped by the client after ~0.2 s,
      plain and streamed, and one cancelled by DELETE: ditrt_steps_total before/after (steps run against
      steps requested);
  (g) batching: n=4 requests at --max-batch 1 against --max-batch 4 (other settings alike): images/s, and
      whether the images are the same;
  (h) SIGTERM under load: C admitted requests must all be answered; arrivals in the next 0.5 s may be refused.
Every POST the client sent (less those refused at connect) must appear in the servers' access logs.
The load generator runs in this process (asyncio + httpx) on the same CPU as the server: on a small machine it
takes part of the CPU the server would otherwise have (its own CPU seconds are reported).
"""

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

SCRIPTS = Path(sys.executable).parent
GEN = "/v1/images/generations"
SENT = {"posts": 0, "refused": 0}  # POSTs this client sent, and refused at connect (vs the access logs)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


# --- the server ---------------------------------------------------------------------------------------------


class Server:
    """One `dit-serve` subprocess on 127.0.0.1 at a free port; its log and access log go to files."""

    def __init__(self, folder: str, workdir: Path, tag: str, **options):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.access_path = workdir / f"{tag}.log", workdir / f"{tag}-access.jsonl"
        self.options = options
        cmd = [str(SCRIPTS / "dit-serve"), folder, "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in options.items():
            if value is not None:
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        cmd += ["--access-log", str(self.access_path)]
        self.cmd = cmd
        self.log = open(self.log_path, "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.startup_s = None

    def wait_ready(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dit-serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    self.startup_s = time.perf_counter() - self.started
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"dit-serve not ready after {timeout_s:g} s:\n{self.tail()}")

    def memory(self) -> dict:
        """VmRSS and VmHWM (peak) of the server process in MB."""
        out = {}
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = round(int(value.split()[0]) / 1024, 1)
        except OSError:
            pass
        return out

    def cpu_s(self) -> float | None:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def access_summary(self) -> dict:
        """The access log's POST /v1/images/generations lines: how many, by status (the server's view)."""
        statuses: dict[str, int] = {}
        try:
            lines = self.access_path.read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("method") == "POST" and entry.get("path") == GEN:
                statuses[str(entry.get("status"))] = statuses.get(str(entry.get("status")), 0) + 1
        return {"posts": sum(statuses.values()), "statuses": dict(sorted(statuses.items()))}

    def tail(self, lines: int = 20) -> str:
        self.log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 20.0) -> dict:
        """SIGTERM (graceful), then SIGKILL if it hangs -> exit code, seconds, and 'Traceback' in the log."""
        t = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        text = self.log_path.read_text(errors="replace")
        return {
            "exit_code": self.proc.returncode,
            "stop_s": round(time.perf_counter() - t, 2),
            "tracebacks_in_log": text.count("Traceback"),
        }


def export_digits(tmp: Path) -> str:
    out = tmp / "digits"
    r = subprocess.run(
        [str(SCRIPTS / "dit-export"), "digits", "-o", str(out)], capture_output=True, text=True, timeout=600
    )
    if r.returncode != 0:
        sys.exit(f"dit-export digits failed: {r.stderr.strip()}")
    return str(out)


# --- the client ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    status: int | None  # None: no HTTP answer
    seconds: float  # send to whole answer read
    error: str | None = None  # "connect:…", "timeout:…", "closed:…" when status is None
    retry_after: str | None = None
    content: bytes = b""
    lag: float = 0.0  # open loop: how late the request went out against its scheduled time


def classify(e: Exception) -> str:
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return f"connect:{type(e).__name__}"
    if isinstance(e, httpx.TimeoutException):
        return f"timeout:{type(e).__name__}"
    return f"closed:{type(e).__name__}"  # RemoteProtocolError, ReadError, WriteError: no answer on the socket


async def post(client: httpx.AsyncClient, body: dict, keep: bool = False, headers=None) -> Result:
    SENT["posts"] += 1
    t = time.perf_counter()
    try:
        r = await client.post(GEN, json=body, headers=headers)
    except httpx.TransportError as e:
        SENT["refused"] += classify(e).startswith("connect:")
        return Result(None, time.perf_counter() - t, classify(e))
    content = r.content if keep or r.status_code != 200 else r.content[:64]
    ok = r.status_code != 200 or b'"b64_json"' in r.content
    return Result(
        r.status_code if ok else -200, time.perf_counter() - t, None, r.headers.get("retry-after"), content
    )


def summarize(results: list[Result], elapsed: float) -> dict:
    """Counts and latency figures of a set of results over `elapsed` seconds."""
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    ok = [r.seconds for r in results if r.status == 200]
    r429 = [r for r in results if r.status == 429]
    errors: dict[str, int] = {}
    for r in results:
        if r.status is None:
            errors[r.error] = errors.get(r.error, 0) + 1
    lags = [r.lag for r in results]
    return {
        "sent": len(results),
        "ok": len(ok),
        "elapsed_s": round(elapsed, 2),
        "throughput_rps": round(len(ok) / elapsed, 2) if elapsed > 0 else None,
        "p50_ms": ms(percentile(ok, 50)),
        "p95_ms": ms(percentile(ok, 95)),
        "p99_ms": ms(percentile(ok, 99)),
        "max_ms": ms(max(ok)) if ok else None,
        "r429": len(r429),
        "r429_with_retry_after": sum(1 for r in r429 if (r.retry_after or "").isdigit()),
        "retry_after_s": sorted({int(r.retry_after) for r in r429 if (r.retry_after or "").isdigit()}),
        "statuses": statuses,
        "no_answer": sum(errors.values()),
        "lost": sum(v for k, v in errors.items() if not k.startswith("connect:")),
        "no_answer_by_kind": errors,
        "client_lag_p99_ms": ms(percentile(lags, 99)),
    }


class Bodies:
    """Request bodies for the served model: the class name or a text prompt, a distinct seed each."""

    def __init__(self, model: dict, steps: int):
        self.model, self.steps, self.seed = model, steps, 1000
        info = model["ditrt"]
        self.prompts = info["classes"] if info["conditioning"] == "class" else ["a 7", "the digit 3", "a 0"]

    def __call__(self, n: int = 1, seed: int | None = None, **extra) -> dict:
        if seed is None:
            self.seed += n
            seed = self.seed
        prompt = self.prompts[seed % len(self.prompts)]
        body = {"model": self.model["id"], "prompt": prompt, "seed": seed, "n": n}
        return body | {"num_inference_steps": self.steps} | extra


class Budget:
    """The run's time and request bounds. The timed phases (name -> planned seconds, in run order) share
    what is left: when time is short each gets its planned share of it, so all run, shorter."""

    OVERHEAD_S = 0.8  # per timed phase: the open loop's drain, a batching phase's warm-up and probe
    STOP_S = 3.0  # the shutdown-under-load phase and stopping both servers at the end

    def __init__(self, seconds: float, max_requests: int, timed: dict[str, float]):
        self.end, self.requests_left, self.timed = time.monotonic() + seconds, max_requests, timed
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.monotonic()

    def fit(self, name: str) -> float:
        """Seconds the timed phase `name` may run (0: skipped, noted)."""
        names = list(self.timed)
        rest = sum(self.timed[n] + self.OVERHEAD_S for n in names[names.index(name) :])
        scale = min(1.0, max(0.0, self.left() - self.STOP_S) / rest)
        have = self.timed[name] * scale
        if have < min(0.3, self.timed[name]) or self.requests_left <= 0:
            self.skipped.append(name)
            return 0.0
        return have

    def allow(self, name: str, cost_s: float) -> bool:
        """Whether an untimed phase of about cost_s fits (it runs before the timed ones)."""
        if self.left() - self.STOP_S - cost_s < 0.3 * sum(self.timed.values()) or self.requests_left <= 0:
            self.skipped.append(name)
            return False
        return True

    def take(self, n: int) -> bool:
        self.requests_left -= n
        return self.requests_left >= 0


def new_client(url: str, timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        timeout=httpx.Timeout(timeout_s, connect=10.0),
        limits=httpx.Limits(max_connections=2000, max_keepalive_connections=200),
    )


async def closed_loop(client, bodies: Bodies, clients: int, seconds: float, budget: Budget, n: int = 1):
    """`clients` loops each sending the next request when the last is answered, for `seconds`."""
    results: list[Result] = []
    end = time.perf_counter() + seconds

    async def loop():
        while time.perf_counter() < end and budget.take(1):
            results.append(await post(client, bodies(n=n)))

    t = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(clients)))
    return results, time.perf_counter() - t


async def open_loop(client, bodies: Bodies, rate: float, seconds: float, cap: int, budget: Budget, seed: int):
    """Poisson arrivals at `rate`/s for `seconds` (at most `cap` requests), each sent whatever the others do;
    then waits for every answer (bounded by the client timeout)."""
    rng, loop = random.Random(seed), asyncio.get_running_loop()
    tasks, t0 = [], loop.time()
    due = t0

    async def one(due_at: float) -> Result:
        lag = loop.time() - due_at
        r = await post(client, bodies())
        r.lag = lag
        return r

    while len(tasks) < cap and budget.take(1):
        due += rng.expovariate(rate)
        if due - t0 > seconds:
            break
        await asyncio.sleep(max(0.0, due - loop.time()))
        tasks.append(asyncio.create_task(one(due)))
    sent_s = loop.time() - t0
    results = await asyncio.gather(*tasks)
    return results, sent_s, loop.time() - t0


# --- metrics ------------------------------------------------------------------------------------------------

SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


async def metric(client, family: str, **labels) -> float:
    """The sum of the samples of `family` whose labels include `labels`."""
    text = (await client.get("/metrics")).text
    total = 0.0
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and m[1] == family:
            have = dict(LABEL.findall(m[2] or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m[3])
    return total


async def settle(client, family: str, model: str, max_s: float = 15.0) -> tuple[float, float]:
    """Polls the counter until it stops moving (3 equal reads 0.1 s apart) -> (value, seconds waited)."""
    t, last, same = time.perf_counter(), None, 0
    while time.perf_counter() - t < max_s:
        value = await metric(client, family, model=model)
        same = same + 1 if value == last else 0
        if same >= 3:
            break
        last = value
        await asyncio.sleep(0.1)
    return last, time.perf_counter() - t


# --- phases -------------------------------------------------------------------------------------------------


async def determinism(client, bodies: Bodies, count: int) -> dict:
    """The same bodies serially, then all at once: the images per seed must be identical."""
    set_ = [bodies(n=1 + i % 3, seed=5000 + 10 * i) for i in range(count)]

    def images(results: list[Result]) -> dict:
        out = {}
        for body, r in zip(set_, results):
            if r.status == 200:
                answer = json.loads(r.content)
                out.update(zip(answer["ditrt"]["seeds"], (d["b64_json"] for d in answer["data"])))
        return out

    serial = [await post(client, b, keep=True) for b in set_]
    concurrent = await asyncio.gather(*(post(client, b, keep=True) for b in set_))
    a, b = images(serial), images(concurrent)
    same = [s for s in a if s in b and a[s] == b[s]]
    return {
        "requests": count,
        "images_serial": len(a),
        "images_concurrent": len(b),
        "identical": len(same),
        "differing_seeds": sorted(s for s in a if s in b and a[s] != b[s]),
        "statuses_concurrent": sorted({str(r.status) for r in concurrent}),
        "all_identical": len(same) == len(a) == len(b) == sum(x.get("n", 1) for x in set_),
        "_images": a,
    }


async def streaming(client, bodies: Bodies, steps: int) -> dict:
    """A streamed request with 3 partial images: seconds to the first partial image and to the end."""
    body = bodies(stream=True, partial_images=3, num_inference_steps=steps)
    t, first, events, completed, b64 = time.perf_counter(), None, [], None, None
    SENT["posts"] += 1
    async with client.stream("POST", GEN, json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
                if line[7:] == "image_generation.partial_image" and first is None:
                    first = time.perf_counter() - t
            elif line.startswith("data: ") and events and events[-1] == "image_generation.completed":
                completed = time.perf_counter() - t
                b64 = json.loads(line[6:])["b64_json"]
    total = time.perf_counter() - t
    plain = await post(client, {k: v for k, v in body.items() if k not in ("stream", "partial_images")}, True)
    same = plain.status == 200 and json.loads(plain.content)["data"][0]["b64_json"] == b64
    return {
        "status": status,
        "steps": steps,
        "partial_images": events.count("image_generation.partial_image"),
        "events": len(events),
        "first_partial_ms": ms(first),
        "completed_ms": ms(completed),
        "total_ms": ms(total),
        "first_partial_fraction": round(first / total, 3) if first else None,
        "completed_image_equals_plain_request": same,
    }


async def cancellation(url, client, bodies: Bodies, model: str, steps: int, n: int, max_batch: int, how: str):
    """A long request dropped after ~0.2 s (how = plain | stream) or cancelled by DELETE: steps run."""
    requested = steps * math.ceil(n / max_batch)  # one engine step per unit of <= max_batch images
    before = await metric(client, "ditrt_steps_total", model=model)
    cancelled_before = await metric(client, "ditrt_cancelled_total", model=model)
    body = bodies(n=n, num_inference_steps=steps) | ({"stream": True} if how == "stream" else {})
    rid = f"bench-cancel-{how}-{os.getpid()}-{time.monotonic_ns()}"
    own = new_client(url, 120.0)  # its own connection, closed by the cancel
    answer: dict = {}

    async def request():
        SENT["posts"] += 1
        async with own.stream("POST", GEN, json=body, headers={"x-request-id": rid}) as r:
            answer["status"] = r.status_code
            answer["body"] = (await r.aread())[:300].decode(errors="replace")

    task = asyncio.create_task(request())
    t0 = time.perf_counter()
    await asyncio.sleep(0.2)
    if how == "delete":
        d = await client.delete(f"{GEN}/{rid}")
        answer["delete_status"] = d.status_code
        try:
            await asyncio.wait_for(task, 30)
        except (asyncio.TimeoutError, httpx.TransportError) as e:
            answer["error"] = type(e).__name__
    else:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, httpx.TransportError):
            pass
    dropped = time.perf_counter() - t0
    await own.aclose()
    after, waited = await settle(client, "ditrt_steps_total", model)
    follow = await post(client, bodies())
    out = {
        "how": how,
        "steps_per_call": steps,
        "n": n,
        "steps_requested": requested,
        "steps_run": int(after - before),
        "dropped_after_ms": ms(dropped),
        "counter_settled_after_ms": ms(waited),
        "cancelled_total_delta": int(
            await metric(client, "ditrt_cancelled_total", model=model) - cancelled_before
        ),
        "follow_up_status": follow.status,
    }
    if how == "delete":
        out.update(
            delete_status=answer.get("delete_status"),
            request_status=answer.get("status"),
            request_body=answer.get("body", answer.get("error")),
        )
    return out


async def shutdown_under_load(server: Server, args) -> dict:
    """SIGTERM while C requests are admitted (running or queued), then 0.5 s more of arrivals: the admitted
    ones must all be answered (graceful shutdown); later ones may be refused (503, connection refused), and
    none should go unanswered on an accepted connection."""
    client = new_client(server.url, args.request_timeout_s)
    try:
        model = (await client.get("/v1/models")).json()["data"][0]
        bodies = Bodies(model, args.steps)
        capacity = args.concurrency + args.queue_size
        admitted = [asyncio.create_task(post(client, bodies(seed=9000 + i))) for i in range(capacity)]
        await asyncio.sleep(0.1)
        t = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        late = []
        while time.perf_counter() - t < 0.5:
            late.append(asyncio.create_task(post(client, bodies(seed=9500 + len(late)))))
            await asyncio.sleep(0.02)
        first, after = await asyncio.gather(*admitted), await asyncio.gather(*late)
    finally:
        await client.aclose()
    try:
        code = await asyncio.to_thread(server.proc.wait, 30)
    except subprocess.TimeoutExpired:
        code = None
    keep = ("sent", "ok", "statuses", "no_answer", "lost", "no_answer_by_kind", "p99_ms")
    return {
        "sent_before_signal": {k: v for k, v in summarize(first, 1.0).items() if k in keep},
        "sent_after_signal": {k: v for k, v in summarize(after, 1.0).items() if k in keep},
        "exit_code": code,
        "exit_after_signal_s": round(time.perf_counter() - t, 2),
    }


async def batching_phase(client, bodies: Bodies, clients: int, seconds: float, budget: Budget) -> dict:
    out = {}
    for c in (1, clients):
        results, elapsed = await closed_loop(client, bodies, c, seconds, budget, n=4)
        s = summarize(results, elapsed)
        out[f"clients_{c}"] = {
            "requests_ok": s["ok"],
            "images_per_s": round(4 * s["ok"] / elapsed, 2),
            "p50_ms": s["p50_ms"],
            "statuses": s["statuses"],
            "no_answer": s["no_answer"],
        }
    probe = await post(client, bodies(n=4, seed=777), keep=True)
    out["_probe_images"] = json.loads(probe.content)["data"] if probe.status == 200 else None
    return out


# --- the run ------------------------------------------------------------------------------------------------


async def run_main(server: Server, args, budget: Budget) -> dict:
    out: dict = {"startup_s": round(server.startup_s, 2), "rss_mb": {"ready": server.memory()}}
    client = new_client(server.url, args.request_timeout_s)
    try:
        models = (await client.get("/v1/models")).json()["data"]
        model = models[0]
        out["model"] = {"id": model["id"], **{k: model["ditrt"].get(k) for k in ("conditioning", "size")}}
        bodies = Bodies(model, args.steps)
        for _ in range(3):  # warm-up: first calls allocate
            await post(client, bodies())
        out["rss_mb"]["warm"] = server.memory()
        capacity = args.concurrency + args.queue_size

        # (d) determinism, (e) streaming, (f) cancellation: short, first
        if budget.allow("determinism", 1.5):
            d = await determinism(client, bodies, min(8, capacity))
            out["_images"] = d.pop("_images")
            out["determinism"] = d
        if budget.allow("streaming", 1.0):
            out["streaming"] = await streaming(client, bodies, args.stream_steps)
        cancels = []
        for how in ("plain", "stream", "delete"):
            if budget.allow(f"cancellation ({how})", 1.0):
                cancels.append(
                    await cancellation(
                        server.url,
                        client,
                        bodies,
                        model["id"],
                        args.cancel_steps,
                        args.cancel_n,
                        args.max_batch,
                        how,
                    )
                )
        out["cancellation"] = cancels

        # (a) closed loop
        closed = {}
        for c in (1, capacity):
            seconds = budget.fit(f"closed x{c}")
            if seconds:
                results, elapsed = await closed_loop(client, bodies, c, seconds, budget)
                closed[f"clients_{c}"] = summarize(results, elapsed)
        out["closed_loop"] = closed
        rate = max((v["throughput_rps"] or 0 for v in closed.values()), default=0) or 1.0
        out["sustainable_rps"] = rate

        # (b) open loop
        opened = {}
        for k, factor in enumerate((1, 2, 4)):
            seconds = budget.fit(f"open {factor}x")
            if not seconds:
                continue
            cpu0 = time.process_time()
            results, sent_s, total_s = await open_loop(
                client, bodies, rate * factor, seconds, args.requests_per_level, budget, seed=k
            )
            s = summarize(results, total_s)
            s.update(
                factor=factor,
                offered_rps=round(rate * factor, 2),
                sent_rps=round(len(results) / sent_s, 2) if sent_s else None,
                window_s=round(sent_s, 2),
                client_cpu_s=round(time.process_time() - cpu0, 2),
            )
            opened[f"{factor}x"] = s
        out["open_loop"] = opened
        out["rss_mb"]["after_load"] = server.memory()

        # (g) batching, this server's half
        seconds = budget.fit("batching main")
        if seconds:
            out["batching"] = await batching_phase(client, bodies, capacity, seconds / 2, budget)
        out["rss_mb"]["end"] = server.memory()
        out["server_cpu_s"] = server.cpu_s()
    finally:
        await client.aclose()
    return out


async def run_other(server: Server, args, budget: Budget) -> dict:
    client = new_client(server.url, args.request_timeout_s)
    try:
        model = (await client.get("/v1/models")).json()["data"][0]
        bodies = Bodies(model, args.steps)
        for _ in range(3):
            await post(client, bodies(n=4))
        seconds = budget.fit("batching other")
        capacity = args.concurrency + args.queue_size
        out = await batching_phase(client, bodies, capacity, seconds / 2, budget) if seconds else {}
        out["startup_s"] = round(server.startup_s, 2)
        out["rss_mb"] = server.memory()
        return out
    finally:
        await client.aclose()


def server_options(args, max_batch: int) -> dict:
    return dict(
        concurrency=args.concurrency,
        queue_size=args.queue_size,
        max_batch=max_batch,
        timeout=args.server_timeout_s,
        threads=args.threads,
    )


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("onnxruntime", "numpy", "starlette", "uvicorn", "httpx", "ditrt"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def bench(args) -> dict:
    """Both servers (max-batch as asked, and the other of 1/4) start together; the second idles (threads
    waiting on a condition) until the batching phase."""
    q = args.quick
    closed_s, open_s, batch_s = (
        (1.0, args.duration_s or 2.0, 1.0) if q else (5.0, args.duration_s or 10.0, 4.0)
    )
    capacity = args.concurrency + args.queue_size
    plan = {"closed x1": closed_s, f"closed x{capacity}": closed_s}
    plan |= {f"open {f}x": open_s for f in (1, 2, 4)}
    plan |= {"batching main": 2 * batch_s, "batching other": 2 * batch_s}  # 1 and C clients each
    budget = Budget(args.budget_s, args.max_requests, plan)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        folder = args.model_folder or export_digits(tmp)
        result: dict = {
            "device": f"CPU: {cpu_name()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(["python", "benchmarks/bench_serve.py", *sys.argv[1:]]),
            "model_folder": args.model_folder or "digits (dit-export digits to a temp folder)",
            "export_s": None if args.model_folder else round(time.perf_counter() - t, 1),
            "loadavg_start": loadavg(),
            "settings": {
                "steps": args.steps,
                "concurrency": args.concurrency,
                "queue_size": args.queue_size,
                "max_batch": args.max_batch,
                "threads": args.threads,
                "server_timeout_s": args.server_timeout_s,
                "budget_s": args.budget_s,
                "plan_s": plan,
                "requests_per_level": args.requests_per_level,
                "max_requests": args.max_requests,
                "nice": os.nice(0),
            },
            "versions": versions(),
        }
        other_batch = 1 if args.max_batch != 1 else 4
        server = Server(folder, tmp, "main", **server_options(args, args.max_batch))
        other = Server(folder, tmp, "other", **server_options(args, other_batch))
        result["server_command"] = " ".join(server.cmd)
        try:
            server.wait_ready(60)
            other.wait_ready(60)
            main = asyncio.run(run_main(server, args, budget))
            result["other"] = asyncio.run(run_other(other, args, budget))
            if budget.left() > 1.0:  # its time is reserved in Budget.STOP_S
                main["shutdown_under_load"] = asyncio.run(shutdown_under_load(server, args))
            else:
                budget.skipped.append("shutdown under load")
        finally:
            main_stop, other_stop = server.stop(), other.stop()
        main["stop"] = main_stop
        main["access_log"] = server.access_summary()  # after the stop: every line written
        main.pop("_images", None)
        result["main"] = main
        if "other" in result:
            result["other"]["stop"] = other_stop
            result["other"]["access_log"] = other.access_summary()
        result["batching"] = batching_answer(result, args.max_batch, other_batch)
        result["cross_server_same_images"] = cross_check(result)
    result["skipped"] = budget.skipped
    result["posts_sent"], result["posts_refused_at_connect"] = SENT["posts"], SENT["refused"]
    result["posts_logged"] = main["access_log"]["posts"] + result.get("other", {}).get("access_log", {}).get(
        "posts", 0
    )
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["client_cpu_s"] = round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1)
    result["loadavg_end"] = loadavg()
    return result


def cross_check(result: dict) -> bool | None:
    """The n=4 probe (seed 777) of both servers: identical images (max-batch 1 vs the other)?"""
    a = result["main"].get("batching", {}).pop("_probe_images", None)
    b = result.get("other", {}).pop("_probe_images", None)
    if a is None or b is None:
        return None
    return [x["b64_json"] for x in a] == [x["b64_json"] for x in b]


def batching_answer(result: dict, main_batch: int, other_batch: int) -> dict:
    by = {main_batch: result["main"].get("batching"), other_batch: result.get("other")}
    if not by.get(1) or not by.get(4) or "clients_1" not in by[1] or "clients_1" not in by[4]:
        return {"answer": "not measured"}
    out = {}
    for key in ("clients_1", *[k for k in by[1] if k.startswith("clients_") and k != "clients_1"]):
        if key in by[1] and key in by[4]:
            one, four = by[1][key]["images_per_s"], by[4][key]["images_per_s"]
            out[key] = {
                "max_batch_1_images_per_s": one,
                "max_batch_4_images_per_s": four,
                "ratio": round(four / one, 2) if one else None,
            }
    best = max((v["ratio"] or 0 for v in out.values()), default=0)
    out["answer"] = (
        f"yes: max-batch 4 gives {best:.2f}x the images/s of max-batch 1"
        if best >= 1.1
        else f"no clear gain: best ratio {best:.2f}"
    )
    return out


# --- report -------------------------------------------------------------------------------------------------


def fmt(v) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def report(r: dict) -> str:
    m, lines = r["main"], []
    s = r["settings"]
    lines.append(f"dit-serve on {r['device']}; {r['date']}")
    lines.append(
        f"model {m['model']['id']} ({m['model']['conditioning']}, {m['model']['size']}), {s['steps']} steps, "
        f"concurrency {s['concurrency']}, queue {s['queue_size']}, max-batch {s['max_batch']}; "
        f"startup {m['startup_s']} s"
    )
    lines.append("")
    head = (
        f"{'load':<16} {'sent':>6} {'200':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'429':>5} {'429+RA':>6} {'other':>12} {'lost':>5} {'no-answer':>9}"
    )
    lines.append(head)
    rows = [(f"closed x{k.split('_')[1]}", v) for k, v in m.get("closed_loop", {}).items()]
    rows += [(f"open {k} ({v['offered_rps']:g}/s)", v) for k, v in m.get("open_loop", {}).items()]
    for name, v in rows:
        other = {k: c for k, c in v["statuses"].items() if k not in ("200", "429", "None")}
        lines.append(
            f"{name:<16} {v['sent']:>6} {v['ok']:>6} {fmt(v['throughput_rps']):>7} {fmt(v['p50_ms']):>8} "
            f"{fmt(v['p95_ms']):>8} {fmt(v['p99_ms']):>8} {v['r429']:>5} {v['r429_with_retry_after']:>6} "
            f"{(json.dumps(other) if other else '-'):>12} {v['lost']:>5} {v['no_answer']:>9}"
        )
    lines.append(f"sustainable rate R = {m['sustainable_rps']} req/s (closed loop, best of 1 and C clients)")
    lines.append(
        "server RSS MB: "
        + ", ".join(f"{k} {v.get('VmRSS')}" for k, v in m["rss_mb"].items())
        + f"; peak (VmHWM) {m['rss_mb'].get('end', m['rss_mb'].get('after_load', {})).get('VmHWM')}"
    )
    d = m.get("determinism")
    if d:
        lines.append(
            f"determinism: {d['identical']}/{d['images_serial']} images identical serial vs concurrent "
            f"({d['requests']} requests){'' if d['all_identical'] else ' - DIFFERS: ' + str(d['differing_seeds'])}"
        )
    st_ = m.get("streaming")
    if st_:
        lines.append(
            f"streaming ({st_['steps']} steps, {st_['partial_images']} partial images): first partial "
            f"{st_['first_partial_ms']} ms of {st_['total_ms']} ms total ({st_['first_partial_fraction']}); "
            f"final image = plain request's: {st_['completed_image_equals_plain_request']}"
        )
    for c in m.get("cancellation", []):
        extra = (
            f", DELETE {c['delete_status']}, request answered {c['request_status']}"
            if c["how"] == "delete"
            else ""
        )
        lines.append(
            f"cancel ({c['how']}): {c['steps_run']} of {c['steps_requested']} steps run "
            f"(dropped at {c['dropped_after_ms']} ms), cancelled_total +{c['cancelled_total_delta']}{extra}, "
            f"next request {c['follow_up_status']}"
        )
    b = r.get("batching", {})
    for key, v in b.items():
        if key.startswith("clients_"):
            lines.append(
                f"batching n=4, {key.replace('_', ' x')}: max-batch 1 {v['max_batch_1_images_per_s']} img/s, "
                f"max-batch 4 {v['max_batch_4_images_per_s']} img/s (x{v['ratio']})"
            )
    lines.append(
        f"batching: {b.get('answer')}; same images at both max-batch: {r.get('cross_server_same_images')}"
    )
    sd = m.get("shutdown_under_load")
    if sd:
        pre, post_ = sd["sent_before_signal"], sd["sent_after_signal"]
        lines.append(
            f"SIGTERM under load: {pre['sent']} admitted -> {pre['statuses']}, lost {pre['lost']}; "
            f"{post_['sent']} sent after the signal -> {post_['statuses']} "
            f"(no answer by kind {post_['no_answer_by_kind']}); exit {sd['exit_code']} "
            f"after {sd['exit_after_signal_s']} s"
        )
    lines.append(
        f"POSTs sent {r['posts_sent']} ({r['posts_refused_at_connect']} refused at connect), logged by the "
        f"servers {r['posts_logged']}; "
        f"server stop (SIGTERM): {m['stop']}; wall {r['wall_s']} s; client CPU {r['client_cpu_s']} s; "
        f"load average {r['loadavg_start']} -> {r['loadavg_end']}"
    )
    if r["skipped"]:
        lines.append(f"skipped (budget): {', '.join(r['skipped'])}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-folder", help="engine folder to serve (default: export digits to a temp folder)")
    ap.add_argument("--quick", action="store_true", help="short phases, under 30 s in all")
    ap.add_argument("--budget-s", type=float, help="wall-clock bound of the run (default 110, quick 28)")
    ap.add_argument("--max-requests", type=int, default=20_000, help="bound on the requests of the run")
    ap.add_argument(
        "--requests-per-level", type=int, help="bound per open-loop level (default 2000, quick 400)"
    )
    ap.add_argument("--duration-s", type=float, help="seconds per open-loop level (default 10, quick 2.5)")
    ap.add_argument("--steps", type=int, default=20, help="num_inference_steps of the load requests")
    ap.add_argument("--stream-steps", type=int, default=200, help="steps of the streamed request")
    ap.add_argument("--cancel-steps", type=int, default=1000, help="steps of the request that is cancelled")
    ap.add_argument("--cancel-n", type=int, default=10, help="images of the request that is cancelled")
    ap.add_argument("--concurrency", type=int, default=1, help="dit-serve --concurrency")
    ap.add_argument("--queue-size", type=int, default=16, help="dit-serve --queue-size")
    ap.add_argument(
        "--max-batch", type=int, default=4, help="dit-serve --max-batch (batching compares 1 and 4)"
    )
    ap.add_argument("--threads", type=int, help="dit-serve --threads (default: its own)")
    ap.add_argument("--server-timeout-s", type=float, default=60.0, help="dit-serve --timeout")
    ap.add_argument("--request-timeout-s", type=float, default=90.0, help="client timeout per request")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    args.budget_s = args.budget_s or (28.0 if args.quick else 110.0)
    args.requests_per_level = args.requests_per_level or (400 if args.quick else 2000)
    if args.quick:
        args.cancel_n = min(args.cancel_n, 8)
    result = bench(args)
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    lost = sum(v["lost"] for v in result["main"].get("open_loop", {}).values())
    lost += sum(v["lost"] for v in result["main"].get("closed_loop", {}).values())
    if lost:
        print(f"LOST REQUESTS: {lost}", file=sys.stderr)


if __name__ == "__main__":
    main()
