"""The dit-serve playground (GET /, serve/playground.html) in a real headless browser: Debian's chromium driven by
chromedriver through selenium, against a real `dit-serve` subprocess over the digits and text-digits engines.

The page's images are compared with the same request sent straight to the API, so a wrong request body (a field
lost, a class index off by one, a seed ignored) fails here, not only a page that shows nothing."""

import base64
import contextlib
import io
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ditrt.runtime.pipeline import MAX_STEPS

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PAGE = Path(__file__).resolve().parent.parent / "serve" / "playground.html"

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests need selenium")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = [
    pytest.mark.xdist_group("serve-browser"),
    pytest.mark.skipif(
        not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
        reason="the browser tests need Debian's chromium and chromedriver (/usr/bin/chromium, /usr/bin/chromedriver)",
    ),
]

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,1000",
)


# --------------------------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(
    base: str, path: str, body: dict | None = None, timeout: float = 30, key: str | None = None
) -> tuple[int, bytes]:
    """(status, body) of a GET, or of a JSON POST when body is given; error statuses are answers too."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(base + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@contextlib.contextmanager
def dit_serve(folder: Path, *args: str):
    """Base URL of a dit-serve subprocess on 127.0.0.1 (a free port) run with `args`; its log in `folder`."""
    port = free_port()
    log = folder / "dit-serve.log"
    script = Path(sys.executable).parent / "dit-serve"
    cmd = (
        [str(script)]
        if script.is_file()
        else [sys.executable, "-c", "from ditrt.serve.cli import main; main()"]
    )
    cmd += [*args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dit-serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if http(base, "/ready", timeout=2)[0] == 200:
                    break
            except OSError:  # not listening yet
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dit-serve was not ready within 60 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.1)
        yield base
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def server(digits_engine, text_digits_engine, tmp_path_factory):
    """A dit-serve serving "digits" and "text-digits", no API keys."""
    with dit_serve(
        tmp_path_factory.mktemp("serve-browser"), str(digits_engine), str(text_digits_engine)
    ) as base:
        yield base


@pytest.fixture(scope="module")
def models(server) -> dict[str, dict]:
    status, body = http(server, "/v1/models")
    assert status == 200, body
    found = {m["id"]: m["ditrt"] for m in json.loads(body)["data"]}
    assert {"digits", "text-digits"} <= set(found), found
    return found


def metric(base: str, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 when absent)."""
    status, body = http(base, "/metrics")
    assert status == 200, body
    for line in body.decode().splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line.strip())
        if m and m[1] == name and dict(re.findall(r'(\w+)="([^"]*)"', m[2] or "")) == labels:
            return float(m[3])
    return 0.0


def direct_image(base: str, body: dict):
    """The first image of `body` asked of the API without the page (no stream), as RGB pixels."""
    status, raw = http(base, "/v1/images/generations", body)
    assert status == 200, raw
    return decode(json.loads(raw)["data"][0]["b64_json"])


# --------------------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield d
    finally:
        d.quit()


def wait(driver, timeout: float = 20) -> WebDriverWait:
    return WebDriverWait(driver, timeout, poll_frequency=0.05)


def el(driver, element_id: str):
    return driver.find_element(By.ID, element_id)


def status(driver) -> str:
    return el(driver, "status").text.strip()


def open_page(driver, base: str) -> None:
    driver.get(base + "/")
    wait(driver).until(lambda d: len(Select(el(d, "model")).options) >= 2)
    assert status(driver) == "idle"
    assert not el(driver, "error").is_displayed()


def fill(driver, element_id: str, value) -> None:
    field = el(driver, element_id)
    if field.tag_name == "select":
        Select(field).select_by_value(str(value))
    else:
        field.clear()
        if str(value):
            field.send_keys(str(value))


def generate(driver, until: str = "done", timeout: float = 20) -> None:
    """Click Generate and wait for the page to settle in `until` (a history count guards repeated runs)."""
    before = len(history(driver))
    el(driver, "generate").click()
    settled = ("done", "error", "cancelled")
    wait(driver, timeout).until(
        lambda d: status(d) in settled and (status(d) != "done" or len(history(d)) > before)
    )
    assert status(driver) == until, el(driver, "error").text


def history(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#history .history-item")


def finals(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#result img.final")


def decode(b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64, validate=True))).convert("RGB")


def decode_src(src: str):
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:80]
    return decode(src[len(prefix) :])


def size_of(text: str) -> tuple[int, int]:
    w, h = text.split("x")
    return int(w), int(h)


# --------------------------------------------------------------------------------------------- the tests


def test_text_model_streams_previews_then_final_images_into_the_history(driver, server, models):
    info = models["text-digits"]
    open_page(driver, server)
    fill(driver, "model", "text-digits")
    assert el(driver, "prompt").is_displayed() and not el(driver, "class-label").is_displayed()
    assert el(driver, "steps").get_attribute("value") == str(info["default_steps"])
    assert float(el(driver, "guidance").get_attribute("value")) == pytest.approx(info["default_guidance"])
    size = info["sizes"][-1]
    fill(driver, "prompt", "a handwritten seven")
    fill(driver, "size", size)
    fill(driver, "partial-images", 2)
    fill(driver, "steps", 8)
    fill(driver, "seed", 1234)
    generate(driver)

    assert int(el(driver, "preview-count").text) >= 1
    decode_src(el(driver, "preview").get_attribute("src"))  # a preview is a real PNG too
    [final] = finals(driver)
    src = final.get_attribute("src")
    image = decode_src(src)
    assert image.size == size_of(size)
    assert "seed: 1234" in el(driver, "params").text
    link = driver.find_element(By.CSS_SELECTOR, "#result a[download]")
    assert link.get_attribute("href") == src and "1234" in link.get_attribute("download")
    assert len(history(driver)) == 1
    # the page asked for what its fields say: the API gives the same pixels for the same request
    same = {"model": "text-digits", "prompt": "a handwritten seven", "size": size, "num_inference_steps": 8}
    assert direct_image(server, {**same, "seed": 1234}).tobytes() == image.tobytes()
    assert direct_image(server, {**same, "seed": 1235}).tobytes() != image.tobytes()

    fill(driver, "seed", "")  # random
    generate(driver)
    assert len(history(driver)) == 2
    seed = re.search(r"seed: (\d+)", el(driver, "params").text)
    assert seed, el(driver, "params").text
    second = finals(driver)[0].get_attribute("src")
    history(driver)[-1].click()  # the oldest entry: the first image is shown again
    wait(driver).until(lambda d: [f.get_attribute("src") for f in finals(d)] == [src])
    assert "seed: 1234" in el(driver, "params").text
    history(driver)[0].click()
    wait(driver).until(lambda d: [f.get_attribute("src") for f in finals(d)] == [second])


@pytest.mark.slow
def test_class_model_generates_the_chosen_class(driver, server, models):
    info = models["digits"]
    open_page(driver, server)
    fill(driver, "model", "digits")
    assert el(driver, "class-label").is_displayed() and not el(driver, "prompt").is_displayed()
    labels = [o.text for o in Select(el(driver, "class-label")).options]
    assert labels == [str(c) for c in info["classes"]]
    Select(el(driver, "class-label")).select_by_visible_text("7")
    fill(driver, "partial-images", 1)
    fill(driver, "seed", 42)
    generate(driver)

    [final] = finals(driver)
    image = decode_src(final.get_attribute("src"))
    assert image.size == size_of(info["size"])
    assert "seed: 42" in el(driver, "params").text
    ask = {"model": "digits", "prompt": "", "seed": 42}
    assert direct_image(server, {**ask, "class_label": 7}).tobytes() == image.tobytes()
    assert direct_image(server, {**ask, "class_label": 3}).tobytes() != image.tobytes()


@pytest.mark.slow
def test_a_seed_past_2_53_is_sent_and_shown_exactly(driver, server):
    """JavaScript numbers hold integers exactly only up to 2^53: the page sends and shows the digits typed."""
    seed = 2**53 + 1
    open_page(driver, server)
    fill(driver, "model", "digits")
    Select(el(driver, "class-label")).select_by_visible_text("4")
    fill(driver, "seed", seed)
    fill(driver, "steps", 3)
    generate(driver)
    [final] = finals(driver)
    assert f"seed: {seed}" in el(driver, "params").text
    ask = {"model": "digits", "prompt": "", "class_label": 4, "num_inference_steps": 3}
    assert (
        direct_image(server, {**ask, "seed": seed}).tobytes()
        == decode_src(final.get_attribute("src")).tobytes()
    )
    assert (
        direct_image(server, {**ask, "seed": seed - 1}).tobytes()
        != decode_src(final.get_attribute("src")).tobytes()
    )


def test_a_refused_request_shows_the_servers_error(driver, server):
    open_page(driver, server)
    fill(driver, "model", "text-digits")
    fill(driver, "prompt", "a handwritten two")
    fill(driver, "steps", 0)
    generate(driver, until="error")

    code, raw = http(
        server,
        "/v1/images/generations",
        {"prompt": "a two", "model": "text-digits", "num_inference_steps": 0},
    )
    assert code in (400, 422), raw
    message = json.loads(raw)["error"]["message"]
    assert el(driver, "error").is_displayed()
    assert message in el(driver, "error").text
    assert finals(driver) == [] and history(driver) == []

    fill(driver, "steps", 4)  # the page recovers: the error goes with the next good request
    generate(driver)
    assert not el(driver, "error").is_displayed() and len(finals(driver)) == 1


def test_the_page_fetches_nothing_but_its_own_server(driver, server):
    text = PAGE.read_text()
    assert not re.findall(r"\b(?:https?|wss?|ftp):", text), "the page names an absolute URL"
    assert not re.search(r"(?:src|href|action)\s*=\s*[\"']?//|url\(|@import", text), (
        "the page names a resource"
    )

    driver.get_log("performance")  # drop what earlier tests left
    driver.get_log("browser")
    open_page(driver, server)
    fill(driver, "model", "digits")
    generate(driver)
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    own = [u for u in urls if u.startswith(server + "/")]
    assert server + "/v1/models" in own and server + "/v1/images/generations" in own, urls
    assert [u for u in urls if not u.startswith((server + "/", "data:"))] == []
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


@pytest.mark.slow
def test_cancel_stops_the_generation_on_the_server(driver, server, models):
    info = models["text-digits"]
    open_page(driver, server)
    fill(driver, "model", "text-digits")
    fill(driver, "prompt", "a handwritten five")
    fill(driver, "steps", info.get("max_steps", MAX_STEPS))  # long enough to be cancelled while it runs
    fill(driver, "n", 4)
    cancelled = metric(server, "ditrt_cancelled_total", model="text-digits", reason="client")
    el(driver, "generate").click()
    assert status(driver) == "generating" and el(driver, "cancel").is_enabled()
    wait(driver, 10).until(lambda d: metric(server, "ditrt_in_flight", model="text-digits") >= 1)
    el(driver, "cancel").click()
    wait(driver, 5).until(lambda d: status(d) == "cancelled")
    assert el(driver, "generate").is_enabled() and not el(driver, "cancel").is_enabled()
    assert not el(driver, "error").is_displayed()
    wait(driver, 10).until(
        lambda d: (
            metric(server, "ditrt_cancelled_total", model="text-digits", reason="client") > cancelled
            and metric(server, "ditrt_in_flight", model="text-digits") == 0
        )
    )
    fill(driver, "steps", 4)
    fill(driver, "n", 1)
    generate(driver, timeout=10)  # the worker is free again


@pytest.mark.slow
def test_an_api_key_is_sent_and_kept_for_the_session_only(driver, digits_engine, tmp_path):
    key = "playground-key-1234"
    (tmp_path / "keys").write_text(key + "\n")
    with dit_serve(tmp_path, str(digits_engine), "--api-key-file", str(tmp_path / "keys")) as base:
        code, raw = http(base, "/v1/models")
        assert code == 401, raw
        driver.get(base + "/")  # the page itself needs no key, the model list does
        wait(driver).until(lambda d: status(d) == "error")
        assert json.loads(raw)["error"]["message"] in el(driver, "error").text
        assert Select(el(driver, "model")).options == []

        el(driver, "api-key").send_keys(key)
        el(
            driver, "seed"
        ).click()  # the key field's change event: the model list is asked again, with the key
        wait(driver).until(lambda d: len(Select(el(d, "model")).options) == 1 and status(d) == "idle")
        assert not el(driver, "error").is_displayed()
        generate(driver)
        assert len(finals(driver)) == 1
        assert driver.execute_script("return JSON.stringify(window.sessionStorage)").count(key) == 1
        assert driver.execute_script("return JSON.stringify(window.localStorage)") == "{}"
        assert key not in driver.execute_script("return document.cookie")

        driver.refresh()  # the same tab keeps it: the page loads with the key filled in and works at once
        wait(driver).until(lambda d: len(Select(el(d, "model")).options) == 1 and status(d) == "idle")
        assert el(driver, "api-key").get_attribute("value") == key
        driver.execute_script("window.sessionStorage.clear()")
