"""The web chat page at `/` (server/static/chat.html): served whole and offline-safe, and driven in a real headless
Chromium (Debian's chromium + chromium-driver, through selenium): streamed answers equal to `generate`'s over the
demo pair (completions mode: it has no chat template) and over a tiny chat model, the stats line, the stop
button, and CORS as the browser enforces it for a page from another origin."""

from __future__ import annotations

import http.client
import os
import re
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from live_server import serve, stop

import mlx_gemma_mtp
from mlx_gemma_mtp.sampling import SamplerConfig
from mlx_gemma_mtp.server import make_server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PAGE = Path(mlx_gemma_mtp.__file__).parent / "server" / "static" / "chat.html"
GREEDY = SamplerConfig(temperature=0)
# Host names the browser resolves to 127.0.0.1 (--host-resolver-rules), so a page can come from an origin
# that is not this machine's by name: the server always lets localhost / 127.0.0.1 pages in.
ALLOWED_HOST, OTHER_HOST = "app.test", "other.test"
# A page on another origin: a JSON POST with an Authorization header, which makes the browser send a preflight.
OTHER_ORIGIN_PAGE = b"""<!doctype html><title>another origin</title>
<script>
async function callApi(url) {
  try {
    const r = await fetch(url, {method: "POST", body: JSON.stringify({prompt: "x", max_tokens: 2, temperature: 0}),
                                headers: {"Content-Type": "application/json", "Authorization": "Bearer test"}});
    return `${r.status} ${(await r.json()).object}`;
  } catch (e) {
    return `rejected: ${e.name}`;
  }
}
</script>"""


@pytest.fixture(scope="module")
def demo():
    from mlx_gemma_mtp.demo import demo_dtype, demo_path

    return mlx_gemma_mtp.load(demo_path(), dtype=demo_dtype())


@pytest.fixture(scope="module")
def other_origin():
    """Port of a plain HTTP server that serves OTHER_ORIGIN_PAGE at every path."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):  # http.server's naming
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(OTHER_ORIGIN_PAGE)))
            self.end_headers()
            self.wfile.write(OTHER_ORIGIN_PAGE)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = serve(server)
    yield server.server_address[1]
    stop(server, thread)


@pytest.fixture(scope="module")
def served(demo, other_origin):
    """(base URL, server) of the API over the demo pair; pages from ALLOWED_HOST's origin may call it."""
    server = make_server(demo, "127.0.0.1", 0, model_name="demo",
                         allowed_origins=(f"http://{ALLOWED_HOST}:{other_origin}",))
    thread = serve(server)
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    stop(server, thread)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Chromium and its driver: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--no-proxy-server", "--disable-features=HttpsUpgrades",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
                 f"--host-resolver-rules=MAP {ALLOWED_HOST} 127.0.0.1, MAP {OTHER_HOST} 127.0.0.1"):
        options.add_argument(flag)
    # OpenBLAS preloaded for MLX (LD_PRELOAD) kills Chromium's child processes ("GPU process isn't usable")
    env = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    # both paths given: selenium's driver manager (which downloads drivers) is never asked
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER), env=env))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait(driver, script: str, seconds: float = 40):
    """The first truthy value of the JavaScript expression `script` in the page (fails after `seconds`)."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.05).until(lambda d: d.execute_script(f"return {script}"))


def open_page(driver, url: str, max_tokens: int) -> None:
    driver.get(url)
    wait(driver, "document.getElementById('model').textContent !== 'loading…'")
    for field, value in (("temperature", "0"), ("max-tokens", str(max_tokens))):
        box = driver.find_element("id", field)
        box.clear()
        box.send_keys(value)


def ask(driver, text: str) -> tuple[str, str]:
    """Type `text`, click Send, wait for the whole answer: (answer as shown, stats line)."""
    driver.find_element("id", "prompt").send_keys(text)
    driver.find_element("id", "send").click()
    wait(driver, "!document.getElementById('send').disabled && document.querySelector('.assistant:last-child')")
    answer, stats = (driver.execute_script(f"return document.querySelector('.assistant:last-child .{part}')"
                                           ".textContent") for part in ("answer", "stats"))
    return answer, stats


def expected(bundle, prompt, max_tokens: int) -> tuple[str, int]:
    """(greedy answer, tokens generated) for `prompt`, run in-process."""
    last = list(mlx_gemma_mtp.stream_generate(bundle, prompt, max_tokens=max_tokens, sampler=GREEDY))[-1]
    return mlx_gemma_mtp.generate(bundle, prompt, max_tokens=max_tokens, sampler=GREEDY), last.generation_tokens


STATS = re.compile(r"(\d+) tokens · [\d.]+ tokens/s · MTP acceptance \d+% \(\d+ of \d+ drafted\) · "
                   r"mean accepted length [\d.]+$")


# ---- the page over HTTP -------------------------------------------------------------------------------------

def test_root_serves_the_page_offline_safe(served):
    conn = http.client.HTTPConnection("127.0.0.1", served[1].server_address[1], timeout=30)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 200 and response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert body == PAGE.read_bytes()
    page = body.decode()
    assert not re.search(r"https?:|//[\w.-]+\.[a-z]", page, re.IGNORECASE)  # no URL to any host
    assert all(link.startswith("data:") for link in re.findall(r"(?:src|href)\s*=\s*[\"']?([^\"'\s>]*)", page))
    assert "@import" not in page and "url(" not in page and "innerHTML" not in page
    assert "connect-src 'self'" in page  # the page's own CSP keeps the browser from reaching other hosts


# ---- the page in Chromium -----------------------------------------------------------------------------------

def test_demo_pair_answers_in_the_page_as_generate_does(browser, served, demo):
    url, _ = served
    open_page(browser, url, max_tokens=24)
    assert browser.find_element("id", "model").text == "demo"
    answer, stats = ask(browser, "def fibonacci(n):")  # no chat template: the page continues one text
    assert "no chat template" in browser.find_element("id", "notice").text
    text, tokens = expected(demo, "def fibonacci(n):\n", 24)
    assert answer == text and answer, stats
    assert (m := STATS.match(stats)) and int(m[1]) == tokens
    # the conversation so far is sent with the next turn
    answer, _ = ask(browser, "print(fibonacci(10))")
    assert answer == expected(demo, f"def fibonacci(n):\n{text}print(fibonacci(10))\n", 24)[0]
    # nothing was fetched from anywhere but this server
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert fetched and all(name.startswith(url + "/") for name in fetched)


def test_stop_ends_the_answer_and_the_generation(browser, served):
    url, server = served
    open_page(browser, url, max_tokens=4000)  # the demo writes code for thousands of tokens
    before = server.RequestHandlerClass.state.disconnects
    browser.find_element("id", "prompt").send_keys("import os")
    browser.find_element("id", "send").click()
    wait(browser, "document.querySelector('.assistant:last-child .answer').textContent.length > 20")
    browser.find_element("id", "stop").click()
    stats = wait(browser, "!document.getElementById('send').disabled && "
                          "document.querySelector('.assistant:last-child .stats').textContent")
    assert stats.startswith("stopped")
    tic = time.monotonic()  # the server notices at its next write, within a round
    while server.RequestHandlerClass.state.disconnects == before:
        assert time.monotonic() - tic < 20, "the server kept generating after the page stopped"
        time.sleep(0.02)


def test_chat_model_answers_in_the_page_as_generate_does(browser, pair_dir):
    bundle = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    server = make_server(bundle, "127.0.0.1", 0, model_name="tiny", num_draft_tokens=2)
    thread = serve(server)
    try:
        open_page(browser, f"http://127.0.0.1:{server.server_address[1]}", max_tokens=8)
        answer, stats = ask(browser, "def speculative(draft, verify):")
        messages = [{"role": "user", "content": "def speculative(draft, verify):"}]
        text, tokens = expected(bundle, messages, 8)
        assert answer == text and answer and browser.find_element("id", "notice").text == ""
        assert (m := STATS.match(stats)) and int(m[1]) == tokens
        answer, _ = ask(browser, "for i in range(10):")
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "for i in range(10):"}]
        assert answer == expected(bundle, messages, 8)[0]
    finally:
        stop(server, thread)


@pytest.mark.parametrize(("host", "result"), [
    (ALLOWED_HOST, "200 text_completion"),  # in allowed_origins
    ("127.0.0.1", "200 text_completion"),  # this machine's pages always may
    (OTHER_HOST, "rejected: TypeError"),  # the preflight is refused: the browser's fetch rejects
])
def test_a_page_on_another_origin_calls_the_api_only_when_allowed(browser, served, other_origin, host, result):
    url, _ = served
    browser.get(f"http://{host}:{other_origin}/")
    assert browser.execute_async_script("callApi(arguments[0]).then(arguments[1])",
                                        f"{url}/v1/completions") == result
