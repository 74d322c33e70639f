"""Fuzzing dit-serve's HTTP API in-process: bodies, headers, paths and methods (hypothesis), then the images.

The app is `build_app(load_models([digits, td=text-digits]))` behind starlette's TestClient (no sockets), once
without API keys and once with one. Hypothesis draws request bodies (valid ones, valid ones with 1-3 fields
edited into values of any type or range, unknown keys, nesting, and raw bytes: NaN/Infinity tokens, huge
numbers, deep nesting, bytes that are not UTF-8, non-JSON, empty, sizes just under/over the body limit),
headers (Content-Type variants, Authorization and X-Request-Id junk, Content-Length lies) and paths/methods.
The properties, checked on every answer:
  - never a 5xx;
  - every 4xx is OpenAI's error shape {"error": {"message": str, "type": str, "param": str|None,
    "code": str|None}} with a one-line message (429: with Retry-After; 401: code invalid_api_key);
  - every 200 of POST /v1/images/generations holds n images whose b64_json decodes to a picture of the
    answered size and format (streams: one completed event per image, each decoding alike);
  - a valid body with valid headers is answered 200; with API keys, /v1/* without the key is never a 2xx.
Violations are collected as signatures (status + what broke) and fail the test at the end, one example each.

`--fuzz-seconds S` (tests/conftest.py) sets the budget: this module's loops share S * SHARE seconds, so the
module stays well under 30 s by default (the engine exports of the session fixtures aside). A longer run:
`python -m pytest -n 0 tests/test_serve_fuzz.py --fuzz-seconds 600 -s` prints iterations and statuses per loop.
"""

import base64
import io
import json
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from ditrt.serve.app import ServeOptions, build_app, load_models  # noqa: E402

pytestmark = pytest.mark.xdist_group("serve-fuzz")

SHARE = 0.5  # of --fuzz-seconds for this module's loops together (test_fuzz.py takes the whole budget)
LOOPS = 4  # bodies, raw bodies + headers, paths + methods, the keyed app
LIMIT = 1 << 16  # the apps' max_body_bytes: bodies just under and over it stay cheap to send
KEY = "sk-fuzz-0123456789"
GEN = "/v1/images/generations"
MODELS = ("digits", "td")

# --- values -------------------------------------------------------------------------------------------------

WORDS = [
    "",
    " ",
    "7",
    "a 7",
    "seven",
    "auto",
    "png",
    "jpeg",
    "webp",
    "url",
    "b64_json",
    "16x16",
    "28x28",
    "0x0",
    "99999x99999",
    "16X16",
    "digits",
    "td",
    "euler",
    "ddim",
    "bogus",
    "\0",
    "\udcff",
    "\u202e",
    "x" * 300,
    "NaN",
    "1e999",
    "null",
]
NUMBERS = [0, -1, 1, 2, 3, 4, 9, 10, 11, 100, 101, 1001, 2**31, 2**53 + 1, 2**63, 2**64, 10**80, -(10**30)]
NUMBERS += [0.5, -0.0, 1e-300, 1e300, 1e39, 3.0, 7.0]
scalars = (
    st.none()
    | st.booleans()
    | st.sampled_from(NUMBERS)
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(WORDS)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
FIELDS = [
    "prompt",
    "model",
    "n",
    "size",
    "response_format",
    "output_format",
    "output_compression",
    "user",
    "stream",
    "partial_images",
    "quality",
    "background",
    "moderation",
    "style",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "sampler",
    "class_label",
    "shift",
    "max_sequence_length",
]
UNKNOWN = ["steps", "guidance", "width", "height", "batch_size", "latents", "image", "mask", "__proto__", ""]
text_ok = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # valid Unicode


def near_misses(v):
    """Values one plausible mistake away from v."""
    if isinstance(v, bool):
        return [not v, int(v), str(v).lower(), None]
    if isinstance(v, (int, float)):
        return [0, -1, -v, v + 0.5, v * 10**6, str(v), float(v), [v], v - 1, v + 1, 10**400 // 10**380]
    if isinstance(v, str):
        return [v + "x", "", v.upper(), 5, [v], {"v": v}, v + "\0", " " + v, v * 1000]
    return [{}, [], None]


# --- bodies -------------------------------------------------------------------------------------------------


@st.composite
def valid_bodies(draw, info):
    """A body every field of which is valid for the model drawn (steps <= 4, n <= 3): answered 200."""
    name = draw(st.sampled_from(MODELS))
    m = info[name]["ditrt"]
    body = {"model": name}
    if m["conditioning"] == "class":
        label = draw(st.integers(0, len(m["classes"]) - 1))
        how = draw(st.sampled_from(["prompt", "label", "name", "both"]))
        if how in ("prompt", "both"):
            body["prompt"] = m["classes"][label]
        if how in ("label", "both"):
            body["class_label"] = label if how == "label" else m["classes"][label]
        if how == "name":
            body["class_label"] = m["classes"][label]
    else:
        body["prompt"] = draw(text_ok)
        if draw(st.booleans()):
            body["negative_prompt"] = draw(text_ok)
    stream = draw(st.booleans())
    optional = {
        "n": st.integers(1, 3),
        "size": st.sampled_from(["auto", m["size"]]),
        "response_format": st.just("b64_json"),
        "output_format": st.sampled_from(["png", "jpeg", "webp"]),
        "user": text_ok,
        "stream": st.just(stream),
        "quality": st.sampled_from(["auto", "standard"]),
        "background": st.sampled_from(["auto", "opaque"]),
        "moderation": st.sampled_from(["auto", "low"]),
        "num_inference_steps": st.integers(1, 4),
        "guidance_scale": st.floats(0, 10) | st.integers(0, 10),
        "seed": st.integers(0, 2**31 - 1),
        "sampler": st.sampled_from(m["samplers"]),
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=len(optional))):
        body[key] = draw(optional[key])
    body.setdefault("num_inference_steps", draw(st.integers(1, 4)))
    if body.get("output_format") in ("jpeg", "webp") and draw(st.booleans()):
        body["output_compression"] = draw(st.integers(0, 100))
    if stream and draw(st.booleans()):
        body["stream"] = True
        body["partial_images"] = draw(st.integers(0, 3))
    for key in [k for k, v in body.items() if v is None]:
        del body[key]
    return body


@st.composite
def edited_bodies(draw, info):
    """A valid body with 1-3 edits: a field set to any JSON value or a near miss, deleted, an unknown key
    added, a value nested deeply. Steps are anything here."""
    body = draw(valid_bodies(info))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["any", "near", "near", "del", "unknown", "nest"]))
        key = draw(st.sampled_from(FIELDS))
        if kind == "any":
            body[key] = draw(json_values)
        elif kind == "near":
            body[key] = draw(st.sampled_from(near_misses(body.get(key, 1))))
        elif kind == "del":
            body.pop(key, None)
        elif kind == "unknown":
            body[draw(st.sampled_from(UNKNOWN) | st.text(max_size=8))] = draw(json_values)
        else:
            value = draw(json_values)
            for _ in range(draw(st.integers(1, 40))):
                value = [value] if draw(st.booleans()) else {"k": value}
            body[key] = value
    return body


def dumps(body) -> bytes:
    """JSON as Python writes it: NaN/Infinity tokens for non-finite floats, \\u escapes for lone surrogates."""
    return json.dumps(body, allow_nan=True).encode()


def padded(body: dict, size: int) -> bytes:
    """body with a `user` string making the JSON exactly `size` bytes (or a little over if it cannot)."""
    body = {**body, "user": ""}
    room = size - len(dumps(body))
    return dumps({**body, "user": "u" * max(0, room)})


@st.composite
def raw_bodies(draw, info):
    """Bytes that no JSON writer produces from a valid request, or produce at the edges of the limit."""
    base = dumps(draw(valid_bodies(info)))
    kind = draw(
        st.sampled_from(
            ["empty", "binary", "truncate", "not-utf8", "utf16", "bom", "nest", "digits", "token", "scalar"]
            + ["dup", "limit", "ws", "trailing", "edited"]
        )
    )
    if kind == "empty":
        return b""
    if kind == "binary":
        return draw(st.binary(max_size=64))
    if kind == "truncate":
        return base[: draw(st.integers(0, max(0, len(base) - 1)))]
    if kind == "not-utf8":
        at = draw(st.integers(0, len(base)))
        return (
            base[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xf8"]))
            + base[at:]
        )
    if kind == "utf16":
        return base.decode().encode(draw(st.sampled_from(["utf-16", "utf-32", "utf-16-le"])))
    if kind == "bom":
        return b"\xef\xbb\xbf" + base
    if kind == "nest":
        depth = draw(st.sampled_from([2, 100, 1000, 5000, 30000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        key = draw(st.sampled_from(FIELDS + ["x"]))
        return base[:-1] + f', "{key}": {opener * depth}1{closer * depth}}}'.encode()
    if kind == "digits":
        key = draw(st.sampled_from(["seed", "n", "num_inference_steps", "guidance_scale", "shift", "x"]))
        number = draw(st.sampled_from(["9" * 20, "9" * 4300, "9" * 4301, "9" * 20000, "1e999", "-1e999"]))
        number = number + draw(st.sampled_from(["", ".5", "e5", "e-999"]))
        return base[:-1] + f', "{key}": {number}}}'.encode()
    if kind == "token":
        key = draw(st.sampled_from(["seed", "guidance_scale", "shift", "n", "prompt"]))
        token = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "nan", "inf", "undefined", "None"]))
        return base[:-1] + f', "{key}": {token}}}'.encode()
    if kind == "scalar":
        return draw(st.sampled_from([b"null", b"[]", b"1", b'"x"', b"true", b"[{}]", b"{}", b"{", b"}"]))
    if kind == "dup":
        return base[:-1] + b', "model": "digits", "model": "td"}'
    if kind == "limit":
        return padded(json.loads(base), LIMIT + draw(st.sampled_from([-1, 0, 1, 2, 1000])))
    if kind == "ws":
        return b" \t\r\n" * draw(st.integers(1, 20)) + base + b"\n" * draw(st.integers(0, 3))
    if kind == "trailing":
        return base + draw(st.sampled_from([b"x", b"{}", b",", b"\0", b" // c"]))
    return dumps(draw(edited_bodies(info)))


CONTENT_TYPES = [
    None,  # left out
    "application/json",
    "application/json; charset=utf-8",
    "APPLICATION/JSON",
    "application/json;",
    "application/jsonx",
    "text/plain",
    "text/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "",
    ";",
    "application/*",
]
header_junk = st.binary(max_size=80).map(lambda b: bytes(c for c in b if c not in b"\r\n\0"))
# Content-Length: the true one (left out), or a lie
LENGTHS = [None, None, None, "0", "1", "-1", "abc", "", " 5", "1.5", "99999999999999999999", str(LIMIT + 1)]
LENGTHS += ["\xb2", "\u0663"]  # digits to str.isdigit() that int() does not take


@st.composite
def headers(draw, valid: bool = False):
    """Request headers: valid ones (the key, application/json) or each drawn from junk."""
    out = {}
    if valid:
        out["content-type"] = "application/json"
        out["authorization"] = f"Bearer {KEY}"
        if draw(st.booleans()):
            out["x-request-id"] = draw(st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True))
        return out
    ctype = draw(st.sampled_from(CONTENT_TYPES) | st.text(max_size=20))
    if ctype is not None:
        out["content-type"] = ctype
    auth = draw(
        st.sampled_from(
            [None, f"Bearer {KEY}", f"bearer {KEY}", f"Bearer  {KEY} ", f"Bearer {KEY}x", f"Basic {KEY}"]
            + ["Bearer", "Bearer ", "", f"{KEY}", "Bearer " + KEY[:-1]]
        )
        | header_junk
    )
    if auth is not None:
        out["authorization"] = auth
    rid = draw(
        st.none()
        | st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
        | st.sampled_from(["", " ", "a" * 65, "a b", "../x", "ä", "x\t", "*"])
        | header_junk
    )
    if rid is not None:
        out["x-request-id"] = rid
    length = draw(st.sampled_from(LENGTHS))
    if length is not None:
        out["content-length"] = length
    return out


def encode_headers(h: dict) -> dict:
    """Header values as bytes (latin-1 for str), so that any byte but CR, LF, NUL goes on the wire."""
    return {k: v if isinstance(v, bytes) else v.encode("latin-1", "replace") for k, v in h.items()}


# --- properties ---------------------------------------------------------------------------------------------


def error_shape(r) -> str | None:
    """What is wrong with an error answer's body, or None."""
    try:
        body = r.json()
    except ValueError:
        return f"body is not JSON ({r.headers.get('content-type')}: {r.content[:60]!r})"
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return f"not {{'error': {{...}}}}: {str(body)[:80]}"
    e = body["error"]
    if set(e) != {"message", "type", "param", "code"}:
        return f"error keys {sorted(e)}"
    if not isinstance(e["message"], str) or not e["message"].strip() or "\n" in e["message"].strip():
        return f"message not one line: {e['message']!r:.80}"
    if not isinstance(e["type"], str):
        return f"type {e['type']!r}"
    for k in ("param", "code"):
        if e[k] is not None and not isinstance(e[k], str):
            return f"{k} {e[k]!r}"
    return None


def image_problem(b64, size: str, fmt: str) -> str | None:
    """What is wrong with one b64_json image, or None."""
    try:
        raw = base64.b64decode(b64, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            got_size, got_format = f"{im.width}x{im.height}", im.format
    except Exception as e:  # noqa: BLE001 - whatever it is, it is not an image
        return f"b64_json does not decode to an image ({type(e).__name__})"
    if got_size != size:
        return f"image is {got_size}, answer says {size}"
    if got_format != {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}.get(fmt):
        return f"image is {got_format}, answer says {fmt}"
    return None


def sse_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for frame in text.split("\n\n"):
        if not frame.strip():
            continue
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def generation_problem(r, body) -> str | None:
    """What is wrong with a 200 of POST /v1/images/generations, or None."""
    n = body.get("n") if isinstance(body, dict) and isinstance(body.get("n"), int) else 1
    if not r.headers.get("x-request-id"):
        return "no x-request-id header"
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        try:
            events = sse_events(r.text)
        except (ValueError, KeyError) as e:
            return f"stream is not server-sent events ({type(e).__name__})"
        done = [d for e, d in events if e == "image_generation.completed"]
        errors = [d for e, d in events if e == "error"]
        if errors:  # allowed by the contract, but not for a request that was checked valid
            return f"stream error event: {errors[0]}"[:120]
        if sorted(d["image_index"] for d in done) != list(range(n)):
            return f"completed image_index {[d['image_index'] for d in done]} for n={n}"
        for e, d in events:
            if e not in ("image_generation.partial_image", "image_generation.completed"):
                return f"unknown event {e!r}"
            if e == "image_generation.partial_image" and not 0 <= d.get("partial_image_index", -1) < 3:
                return f"partial_image_index {d.get('partial_image_index')}"
            problem = image_problem(d.get("b64_json"), d.get("size"), d.get("output_format"))
            if problem:
                return f"{e}: {problem}"
        return None
    try:
        answer = r.json()
        data = answer["data"]
    except (ValueError, KeyError, TypeError):
        return f"200 without data: {r.text[:80]}"
    if len(data) != n:
        return f"{len(data)} images for n={n}"
    for item in data:
        problem = image_problem(item.get("b64_json"), answer.get("size"), answer.get("output_format"))
        if problem:
            return problem
    if answer.get("ditrt", {}).get("request_id") != r.headers["x-request-id"]:
        return "ditrt.request_id is not the x-request-id header"
    return None


def problems(r, method: str, path: str, body=None, sent: dict | None = None) -> list[str]:
    """Every property the answer breaks."""
    out, status = [], r.status_code
    if status >= 500:
        out.append("a 5xx")
    if status >= 400 and method != "HEAD":
        shape = error_shape(r)
        if shape:
            out.append(shape)
    if status == 429 and not (r.headers.get("retry-after") or "").isdigit():
        out.append("429 without Retry-After seconds")
    if (
        status == 401
        and method != "HEAD"
        and not error_shape(r)
        and r.json()["error"]["code"] != "invalid_api_key"
    ):
        out.append(f"401 code {r.json()['error']['code']!r}")
    if 300 <= status < 400 and not r.headers.get("location"):
        out.append("redirect without Location")
    if status == 200 and method == "POST" and path == GEN:
        problem = generation_problem(r, body)
        if problem:
            out.append(problem)
        rid = (sent or {}).get("x-request-id")  # an empty one counts as none: the server makes one up
        if isinstance(rid, str) and rid and r.headers.get("x-request-id") != rid:
            out.append("x-request-id not echoed")
    return out


class Outcomes:
    """Statuses per loop, and each broken property (a signature) with the first case that broke it."""

    def __init__(self):
        self.counts, self.broken, self.iterations = Counter(), {}, 0

    def record(self, r, method, path, body=None, sent=None, case=None, extra=()):
        self.iterations += 1
        self.counts[r.status_code] += 1
        for p in [*problems(r, method, path, body, sent), *extra]:
            self.broken.setdefault(f"{r.status_code} {method} {path[:40]}: {p}", (case, r.text[:300]))

    def check(self, name):
        print(f"\n{name}: {self.iterations} requests, statuses {dict(sorted(self.counts.items()))}")
        assert not self.broken, "\n".join(
            f"{sig}\n    from {case!r:.600}\n    answer {text!r}" for sig, (case, text) in self.broken.items()
        )


def fuzz_for(seconds: float, fn, **strategies) -> None:
    """Run body on examples drawn from strategies, in seeded rounds (reproducible), until the budget is spent."""
    deadline, round_ = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        test = given(**strategies)(fn)
        settings(
            max_examples=10,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(seed(round_)(test))()
        round_ += 1


# --- the apps -----------------------------------------------------------------------------------------------


class Served:
    def __init__(self, client: TestClient, keyed: TestClient):
        self.client, self.keyed = client, keyed
        self.info = {m["id"]: m for m in client.get("/v1/models").json()["data"]}


@pytest.fixture(scope="module")
def served(digits_engine, text_digits_engine):
    """Two apps over the two demo models (digits, td): without API keys, and with KEY (its own pipelines)."""
    specs = [str(digits_engine), f"td={text_digits_engine}"]
    options = dict(queue_size=16, timeout_s=60, max_body_bytes=LIMIT, concurrency=1, max_batch=4)
    models, keyed_models = load_models(specs), load_models(specs)
    app = build_app(models, ServeOptions(**options, access_log=io.StringIO()))
    keyed_app = build_app(keyed_models, ServeOptions(**options, api_keys=(KEY,), access_log=io.StringIO()))
    kw = dict(raise_server_exceptions=False, follow_redirects=False)
    try:
        with TestClient(app, **kw) as client, TestClient(keyed_app, **kw) as keyed:
            yield Served(client, keyed)
    finally:
        for pipe in [*models.values(), *keyed_models.values()]:
            pipe.close()


def budget(request) -> float:
    return request.config.getoption("--fuzz-seconds") * SHARE / LOOPS


# --- the fuzz loops -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bodies_answer_in_shape(served, request):
    """Valid bodies (200 with images) and edited ones (any status but 5xx, errors in shape)."""
    outcomes = Outcomes()

    def one(body, valid):
        r = served.client.post(GEN, content=dumps(body), headers={"content-type": "application/json"})
        extra = [f"valid body answered {r.status_code}"] if valid and r.status_code != 200 else []
        outcomes.record(r, "POST", GEN, body, case=body, extra=extra)

    fuzz_for(
        budget(request),
        lambda body: one(body[1], body[0]),
        body=st.tuples(st.just(True), valid_bodies(served.info))
        | st.tuples(st.just(False), edited_bodies(served.info)),
    )
    outcomes.check("body fuzz")


@pytest.mark.slow
def test_raw_bodies_and_headers_answer_in_shape(served, request):
    """Raw bytes as bodies, junk headers (Content-Type, Authorization, X-Request-Id, Content-Length lies)."""
    outcomes = Outcomes()

    def one(raw, sent):
        r = served.client.post(GEN, content=raw, headers=encode_headers(sent))
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            body = None
        outcomes.record(r, "POST", GEN, body, sent, case=(raw[:300], len(raw), sent))

    fuzz_for(budget(request), one, raw=raw_bodies(served.info), sent=headers(valid=True) | headers())
    outcomes.check("raw body + header fuzz")


METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "BREW"]
PATHS = [
    "/",
    "/health",
    "/ready",
    "/metrics",
    "/v1/models",
    "/v1/models/",
    "/v1/models/digits",
    GEN,
    GEN + "/",
    GEN + "/abc",
    GEN + "/abc/def",
    GEN + "/" + "a" * 300,
    GEN + "/%00",
    GEN + "/..",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/chat/completions",
    "/v1",
    "/v1/",
    "//",
    "/%2e%2e/etc/passwd",
    "/v1/../health",
    "/HEALTH",
    "/health/",
    "/playground.html",
    "/" + "x/" * 200,
]


@pytest.mark.slow
def test_paths_and_methods_answer_in_shape(served, request):
    """Every method on known, near-miss and random paths; bodies valid or not."""
    outcomes = Outcomes()

    def one(method, path, body):
        content = None if body is None else dumps(body)
        r = served.client.request(method, path, content=content, headers={"content-type": "application/json"})
        outcomes.record(r, method, path, body, case=(method, path, body))

    fuzz_for(
        budget(request),
        one,
        method=st.sampled_from(METHODS),
        path=st.sampled_from(PATHS)
        | st.text(max_size=30).map(lambda t: "/" + urllib.parse.quote(t, safe="/")),
        body=st.none() | valid_bodies(served.info) | json_values,
    )
    outcomes.check("path + method fuzz")


@pytest.mark.slow
def test_keyed_app_refuses_without_the_key(served, request):
    """With an API key: /v1/* answers 2xx only to `Authorization: Bearer KEY`; the rest as everywhere."""
    outcomes = Outcomes()

    def one(method, path, body, sent):
        ok_key = sent.get("authorization") in (f"Bearer {KEY}", f"bearer {KEY}", f"Bearer  {KEY} ")
        r = served.keyed.request(method, path, content=dumps(body), headers=encode_headers(sent))
        extra = []
        if path.startswith("/v1/") and not ok_key and r.status_code < 300:
            extra.append("a 2xx without the API key")
        outcomes.record(r, method, path, body, sent, case=(method, path, body, sent), extra=extra)

    fuzz_for(
        budget(request),
        one,
        method=st.sampled_from(["GET", "POST", "DELETE"]),
        path=st.sampled_from([GEN, "/v1/models", GEN + "/abc", "/health", "/metrics"]),
        body=valid_bodies(served.info),
        sent=headers() | headers(valid=True),
    )
    outcomes.check("keyed app fuzz")


# --- fixed cases (the fast lane) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"", 400),
        (b"not json", 400),
        (b"\xff\xfe{}", 400),
        (b'{"model": "digits", "prompt": "7", "seed": NaN}', 400),
        (b'{"model": "digits", "prompt": "7", "seed": ' + b"9" * 5000 + b"}", 400),
        (b'{"model": "digits", "prompt": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400),
        (b"[]", 400),
        (b'{"model": "digits", "prompt": "7", "bogus": 1}', 400),
        (b'{"model": "digits", "prompt": "7", "response_format": "url"}', 400),
        (b'{"model": "nope", "prompt": "7"}', 404),
        (b'{"prompt": "7"}', 400),  # two models served: model is required
        (b'{"model": "digits", "prompt": "7", "size": "64x64"}', 422),
    ],
    ids=lambda v: repr(v[:40]) if isinstance(v, bytes) else str(v),
)
def test_fixed_bad_bodies(served, raw, status):
    r = served.client.post(GEN, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text[:300]
    assert error_shape(r) is None, error_shape(r)


def test_body_limit_edges(served):
    """A body of exactly the limit is read; one byte over is 413 (whatever Content-Length says)."""
    base = {"model": "digits", "prompt": "7", "num_inference_steps": 1}
    at, over = padded(base, LIMIT), padded(base, LIMIT + 1)
    assert (len(at), len(over)) == (LIMIT, LIMIT + 1)
    assert served.client.post(GEN, content=at).status_code == 200
    for lie in (None, "10", "0", str(LIMIT)):
        h = {"content-type": "application/json"} | ({"content-length": lie} if lie else {})
        r = served.client.post(GEN, content=over, headers=h)
        assert r.status_code == 413 and error_shape(r) is None, (lie, r.status_code, r.text[:200])


def test_content_length_lies_are_not_5xx(served):
    """Content-Length values a real HTTP parser refuses first, sent straight into the app."""
    body = dumps({"model": "digits", "prompt": "7", "num_inference_steps": 1})
    for lie in LENGTHS[3:]:
        r = served.client.post(GEN, content=body, headers=encode_headers({"content-length": lie}))
        assert r.status_code < 500 and (r.status_code < 400 or error_shape(r) is None), (lie, r.text[:200])


def asgi_post(client: TestClient, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, bytes]:
    """POST straight into the running app (its lifespan held by `client`) with raw header bytes, which
    TestClient would re-encode: (status, body)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": GEN,
        "raw_path": GEN.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "state": dict(client.app_state),
    }

    async def call():
        import anyio

        messages, sent = [{"type": "http.request", "body": body, "more_body": False}], []

        async def receive():
            if messages:
                return messages.pop(0)
            await anyio.sleep_forever()

        async def send(message):
            sent.append(message)

        with anyio.fail_after(60):
            try:
                await client.app(scope, receive, send)
            except Exception:  # noqa: BLE001 - the app re-raises what its 500 handler answered
                pass
        start = next(m for m in sent if m["type"] == "http.response.start")
        return start["status"], b"".join(
            m.get("body", b"") for m in sent if m["type"] == "http.response.body"
        )

    return client.portal.call(call)


@pytest.mark.parametrize("length", [b"\xb2", b"\xb9\xb2", b"1\xb3", b"\xbd"])
def test_content_length_digits_int_refuses_are_not_5xx(served, length):
    """Latin-1 bytes that Starlette decodes to characters str.isdigit() accepts and int() refuses ('²').
    uvicorn's HTTP parsers refuse such a Content-Length with their own 400 before the app; other ASGI
    servers may pass it through."""
    headers = [(b"content-type", b"application/json"), (b"content-length", length)]
    status, body = asgi_post(served.client, headers, dumps({"model": "digits", "prompt": "7"}))
    assert status < 500, (length, status, body[:200])


# --- determinism --------------------------------------------------------------------------------------------

BODIES = [
    {"model": "digits", "prompt": "3", "seed": 11, "num_inference_steps": 4},
    {"model": "digits", "class_label": 5, "seed": 12, "n": 2, "num_inference_steps": 4},
    {
        "model": "digits",
        "prompt": "8",
        "seed": 13,
        "n": 6,
        "num_inference_steps": 3,
    },  # 2 units of max_batch 4
    {"model": "digits", "prompt": "1", "seed": 14, "num_inference_steps": 4, "output_format": "webp"},
    {"model": "td", "prompt": "a 7", "seed": 21, "num_inference_steps": 4},
    {
        "model": "td",
        "prompt": "the digit two",
        "negative_prompt": "blurry",
        "seed": 22,
        "n": 3,
        "num_inference_steps": 4,
    },
    {
        "model": "td",
        "prompt": "a 0",
        "seed": 23,
        "num_inference_steps": 2,
        "stream": True,
        "partial_images": 1,
    },
    {"model": "td", "prompt": "a 9", "seed": 24, "num_inference_steps": 4, "sampler": "ddim"},
]


def images_of(r) -> dict[int, str]:
    """seed -> b64 of each image of a 200 (streams: the completed events)."""
    assert r.status_code == 200, r.text[:300]
    if r.headers["content-type"].startswith("text/event-stream"):
        done = [d for e, d in sse_events(r.text) if e == "image_generation.completed"]
        return {d["ditrt"]["seeds"][0]: d["b64_json"] for d in done}
    answer = r.json()
    return dict(zip(answer["ditrt"]["seeds"], (d["b64_json"] for d in answer["data"])))


def test_concurrent_requests_give_the_serial_images(served):
    bodies = [b for b in BODIES if b.get("sampler") in (None, *served.info[b["model"]]["ditrt"]["samplers"])]

    def post(body):
        return images_of(served.client.post(GEN, json=body))

    serial = [post(b) for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        concurrent = list(pool.map(post, bodies))
    for body, s, c in zip(bodies, serial, concurrent):
        assert len(s) == body.get("n", 1) and s == c, f"{body}: seeds {sorted(s)} vs {sorted(c)} differ"
    # the split into units of max_batch never changes an image: n=6 (4 + 2) against one image per seed
    one_each = [post(dict(BODIES[2], n=1, seed=13 + i)) for i in range(6)]
    assert {k: v for d in one_each for k, v in d.items()} == serial[bodies.index(BODIES[2])]


def test_request_id_in_use_then_deleted(served):
    """A running request's X-Request-Id is refused to another (409); DELETE stops it (499), then frees the id."""
    long = {"model": "digits", "prompt": "4", "n": 10, "num_inference_steps": 1000, "seed": 1}
    rid = {"x-request-id": "fuzz-dup-1"}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(served.client.post, GEN, json=long, headers=rid)
        end = time.monotonic() + 30
        while (
            time.monotonic() < end
            and 'ditrt_in_flight{model="digits"} 1.0' not in served.client.get("/metrics").text
        ):  # until it runs (nothing else runs on digits now)
            time.sleep(0.01)
        r = served.client.post(
            GEN, json={"model": "digits", "prompt": "1", "num_inference_steps": 1}, headers=rid
        )
        assert r.status_code == 409 and error_shape(r) is None, r.text[:200]
        d = served.client.delete(f"{GEN}/fuzz-dup-1")
        assert d.status_code == 200 and d.json()["cancelled"] is True, d.text[:200]
        answer = first.result(timeout=30)
    assert answer.status_code == 499 and error_shape(answer) is None, answer.text[:200]
    assert served.client.delete(f"{GEN}/fuzz-dup-1").status_code == 404
    again = served.client.post(
        GEN, json={"model": "digits", "prompt": "1", "num_inference_steps": 1}, headers=rid
    )
    assert again.status_code == 200 and again.headers["x-request-id"] == "fuzz-dup-1"
