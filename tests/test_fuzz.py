"""Fuzzing the runtime's two doors: engine-folder manifests and generation requests.

Hypothesis mutates a valid manifest (1-3 edits: a value replaced by any JSON value or a near-miss of the
original, a key deleted or added) and a valid request (each parameter drawn from values of every type and
range), then goes through `load_manifest`, `Pipeline.load` and one generation. The property: every failure is a
project error (DitError) with a one-line message; a success is a finite image. Non-project exceptions are
collected as signatures (type + message start) and fail the test, listing the edits that caused each.

`--fuzz-seconds S` sets the wall-clock budget shared by the fuzz loops (CI: 30 s); a longer run, e.g.
`python -m pytest tests/test_fuzz.py --fuzz-seconds 600 -s`, prints iterations and outcomes per loop.
The loops are marked slow (they spend their whole budget); inputs that once crashed live in
tests/fuzz_corpus.jsonl and replay on every run, the fast lane included.
"""

import copy
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from ditrt.runtime.errors import DitError
from ditrt.runtime.manifest import MANIFEST_NAME
from ditrt.runtime.pipeline import Pipeline

pytestmark = pytest.mark.xdist_group(
    "fuzz"
)  # with -n, one worker: the other need not wait for the same engines

CORPUS = Path(__file__).with_name("fuzz_corpus.jsonl")
LOOPS = 4  # the fuzz loops below share --fuzz-seconds: manifests of two models, requests to two models

# values of every JSON type, weighted toward the ones that break parsers: huge and tiny numbers, NaN/inf,
# NUL and lone surrogates, paths, names the runtime knows
WORDS = [
    "",
    "x",
    "x0",
    "B",
    "n",
    "T",
    "bogus",
    "float16",
    "int64",
    "../x.onnx",
    "/etc/passwd",
    "a\0b",
    "\udcff",
    "denoiser/model.onnx",
    "tokenizer/tokenizer.json",
    "manifest.json",
    "NaN",
    "1e999",
    "text",
    "class",
    "image",
    "latents",
    "input_ids",
    "prompt_embeds",
    "FlowMatchEulerDiscreteScheduler",
    "DDIMScheduler",
]
NUMBERS = [0, -1, 1, 2, 3, 9, 16, 255, 2**31, 2**63, 10**80, -(10**30), 0.5, 1e-300, 1e300, -0.0]
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
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(WORDS) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)


def paths(tree, prefix=()):
    """Every path (tuple of keys/indices) into a JSON tree, the root's children first."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        yield (*prefix, k)
        yield from paths(v, (*prefix, k))


def near_misses(v):
    """Values one plausible mistake away from v: a number off by a factor or in the wrong type, a list short."""
    if isinstance(v, bool):
        return [not v, int(v), str(v).lower()]
    if isinstance(v, (int, float)):
        return [0, -v, v + 0.5, v * 10**6, str(v), float(v), [v], v - 1, v + 1]
    if isinstance(v, str):
        return [v + "x", "", v.upper(), 5, [v], v + "\0", "../" + v]
    if isinstance(v, list):
        return [[], v[:-1], v + v[-1:], v[::-1], dict(enumerate(v))]
    return [{}, [], None]


@st.composite
def edits(draw, base):
    """1-3 edits of base: (path, "set", value) | (path, "del") | (path, "add", key, value)."""
    all_paths = list(paths(base))
    out = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(all_paths))
        kind = draw(st.sampled_from(["near", "near", "any", "del", "add"]))
        if kind == "near":
            out.append((path, "set", draw(st.sampled_from(near_misses(get(base, path))))))
        elif kind == "any":
            out.append((path, "set", draw(json_values)))
        elif kind == "del":
            out.append((path, "del"))
        else:
            out.append((path, "add", draw(st.sampled_from(WORDS)), draw(json_values)))
    return out


def get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def apply(base, edit_list):
    """A deep copy of base with the edits applied (an edit whose path no longer exists is skipped)."""
    tree = json.loads(json.dumps(base))
    for path, op, *rest in edit_list:
        try:
            parent, key = get(tree, path[:-1]), path[-1]
            if op == "set":
                parent[key] = copy.deepcopy(rest[0])  # a later edit may change it; base must stay as it is
            elif op == "del":
                del parent[key]
            elif isinstance(parent[key], dict):
                parent[key][rest[0]] = copy.deepcopy(rest[1])
        except (KeyError, IndexError, TypeError):
            pass
    return tree


def nest(depth: int) -> str:
    return "[" * depth + "]" * depth


class Outcomes:
    """What each fuzz iteration ended in: "ok", a project error's type, or a non-project signature."""

    def __init__(self):
        self.counts, self.crashes, self.iterations = Counter(), {}, 0

    def run(self, fn, case):
        self.iterations += 1
        try:
            fn()
            self.counts["ok"] += 1
        except DitError as e:
            assert "\n" not in str(e).strip(), f"a multi-line error: {e!r}"
            self.counts[type(e).__name__] += 1
        except Exception as e:  # noqa: BLE001 - the property under test: nothing else escapes
            signature = f"{type(e).__name__}: {str(e).strip()[:80]}"
            self.crashes.setdefault(signature, case)
            self.counts["crash"] += 1

    def check(self, name):
        print(
            f"\n{name}: {self.iterations} iterations, outcomes {dict(self.counts)}, "
            f"{len(self.crashes)} non-project signature(s)"
        )
        assert not self.crashes, "\n".join(f"{sig}\n    from {case!r}" for sig, case in self.crashes.items())


def fuzz_for(seconds: float, body, **strategies) -> None:
    """Run body on examples drawn from strategies, in seeded rounds, until the time budget is spent."""
    deadline, round_ = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        test = given(**strategies)(body)
        settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))(
            seed(round_)(test)
        )()
        round_ += 1


def generate_once(folder: Path, verify: bool) -> None:
    """Load the folder and generate one image; a success must be a finite image."""
    with Pipeline.load(folder, verify=verify) as pipe:
        text = pipe.manifest.conditioning == "text"
        result = pipe(prompt="a 7" if text else None, class_label=None if text else 7, steps=2, seed=0)
    assert np.isfinite(result.pixels).all() and result.images[0].dtype == np.uint8


@pytest.fixture(params=["digits", "text-digits"])
def engine(request, digits_engine, text_digits_engine, tmp_path):
    """A private copy of an engine folder whose manifest.json the test rewrites; (folder, original manifest)."""
    src = {"digits": digits_engine, "text-digits": text_digits_engine}[request.param]
    dst = tmp_path / request.param
    shutil.copytree(src, dst)
    return dst, json.loads((src / MANIFEST_NAME).read_text())


@pytest.mark.slow
def test_manifest_mutations_fail_only_with_project_errors(engine, request):
    folder, base = engine
    outcomes = Outcomes()

    def one(edit_list, verify):
        (folder / MANIFEST_NAME).write_text(json.dumps(apply(base, edit_list)))
        outcomes.run(lambda: generate_once(folder, verify), edit_list)

    fuzz_for(
        request.config.getoption("--fuzz-seconds") / LOOPS, one, edit_list=edits(base), verify=st.booleans()
    )
    outcomes.check(f"manifest fuzz ({base['model']})")


# requests: each parameter from the values a caller could pass, of any type (None = left out)
ints = (
    st.integers(-3, 6) | st.sampled_from([0, 1001, 10**20, -(2**63)]) | st.builds(np.int64, st.integers(0, 5))
)
numbers = (
    ints
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([1e6, 1e39, -0.0, 100.0])
    | st.builds(np.float32, st.floats(0, 10))
)
anything = (
    st.none()
    | st.booleans()
    | st.text(max_size=5)
    | st.binary(max_size=4)
    | st.lists(st.integers(), max_size=2)
)
prompts = (
    st.text(max_size=40) | st.sampled_from(["a 7", "\udcff", "\0", "x" * 3000, "seven" * 200]) | anything
)
REQUEST = dict(
    prompt=prompts,
    negative_prompt=prompts,
    class_label=ints | st.sampled_from(["7", "seven", "²"]) | anything,
    steps=st.integers(1, 4) | ints | anything,
    guidance=numbers | anything,
    seed=ints | numbers | anything,
    batch_size=st.integers(1, 2) | ints | anything,
    width=ints | st.sampled_from([16, 64]) | anything,
    height=ints | st.sampled_from([16, 64]) | anything,
    shift=numbers | anything,
    sampler=st.sampled_from(["euler", "ddim", "dpm++2m", "dpm++2m-karras", "bogus", ""]) | anything,
    max_sequence_length=ints | st.sampled_from([64, 300, 512]) | anything,
)


@st.composite
def requests(draw, conditioning):
    """A request valid for the model except for 0-3 parameters drawn from REQUEST."""
    kwargs = {"prompt": "a 7", "steps": 2} if conditioning == "text" else {"class_label": 7, "steps": 2}
    for name in draw(st.lists(st.sampled_from(sorted(REQUEST)), max_size=3, unique=True)):
        kwargs[name] = draw(REQUEST[name])
    if draw(st.booleans()):  # caller latents: of the right shape or not, finite or not
        kwargs["latents"] = draw(st.sampled_from(["ok", "shape", "dtype", "nan", "huge", "list"]))
    return kwargs


def latents_for(kind: str, pipe: Pipeline, batch) -> object:
    lat = pipe.manifest.latent
    n = batch if isinstance(batch, int) and not isinstance(batch, bool) and 1 <= batch <= 4 else 1
    x = np.random.default_rng(0).standard_normal((n, lat.channels, lat.height, lat.width)).astype(np.float32)
    return {
        "ok": x,
        "shape": x[:, :, :-1],
        "dtype": x.astype(np.float64),
        "nan": x * np.nan,
        "huge": x * np.float32(1e30),
        "list": x.tolist(),
    }[kind]


@pytest.mark.slow
def test_requests_fail_only_with_project_errors(digits_engine, text_digits_engine, request):
    outcomes = Outcomes()
    for folder in (digits_engine, text_digits_engine):
        with Pipeline.load(folder) as pipe:

            def one(kwargs):
                if "latents" in kwargs:
                    kwargs["latents"] = latents_for(kwargs["latents"], pipe, kwargs.get("batch_size", 1))

                def call():
                    result = pipe(**kwargs)
                    assert np.isfinite(result.pixels).all() and len(result.images) == len(result.seeds)

                outcomes.run(call, kwargs)

            fuzz_for(
                request.config.getoption("--fuzz-seconds") / LOOPS,
                one,
                kwargs=requests(pipe.manifest.conditioning),
            )
    outcomes.check("request fuzz")


def corpus():
    return [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("case", corpus(), ids=lambda c: c["id"])
def test_corpus_of_past_crashes_is_refused_in_one_line(case, request, tmp_path):
    """Each input that once escaped as a non-project exception is now refused with the message it deserves."""
    folder = tmp_path / case["base"]
    engine = request.getfixturevalue("digits_engine" if case["base"] == "digits" else "text_digits_engine")
    # hard links: the engine files are shared, only manifest.json (replaced below, not written through) differs
    shutil.copytree(engine, folder, copy_function=os.link)
    path = folder / MANIFEST_NAME
    if "raw" in case:  # a manifest text no JSON value can express: deep nesting, huge integers
        text = case["raw"].replace("{NEST}", nest(100_000)).replace("{DIGITS}", "9" * 5000)
    else:
        text = json.dumps(
            apply(json.loads(path.read_text()), [(tuple(p), *rest) for p, *rest in case["edits"]])
        )
    path.unlink()
    path.write_text(text)
    with pytest.raises(DitError) as e:
        generate_once(folder, verify=True)
    message = str(e.value)
    assert "\n" not in message and case["expect"] in message and len(message) < 400, message
