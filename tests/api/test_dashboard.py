"""The web dashboard, in a real headless Chromium (Debian's package, driven by Playwright's sync API).

The page must load with no console errors, its charts must move while
inference runs, a finetuning job's loss curve must appear and the job must be
cancellable from the page; with an API key the data routes answer 401 and the
page asks for the key. The engine here has a TPOT SLO so the SLO line and the
latency profile are drawn. Browser tests skip only where /usr/bin/chromium is
absent (.ci/setup installs it).
"""
import json
import os
import threading
import time
import urllib.error
import urllib.request

import pytest
from peft import LoraConfig

from coserve import LLM, FinetuneConfig, SamplingParams
from coserve.api.backend import LocalBackend
from tests.helpers import make_peft_adapter_dir

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# NOTE: generous for a 2-layer model (iterations take a few ms): the SLO must be drawn, not bind.
SLO_MS = 250.0
# max_model_len=128 keeps the start-up latency profile to its two smallest sizes (a few hundred ms).
HEADROOM = 0.2
ENGINE = dict(dtype="float32", device="cpu", max_num_batched_tokens=64, max_model_len=128, tpot_slo_ms=SLO_MS,
              finetune_slo_headroom=HEADROOM)
API_KEY = "dashboard-test-key"
WAIT_MS = 20_000
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)

needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason=f"{CHROMIUM} is missing: .ci/setup installs Debian's chromium package")


@pytest.fixture(scope="module")
def backend(tiny_llama_dir):
    """Overrides conftest's backend: the same tiny engine, with a TPOT SLO (so a latency profile)."""
    backend = LocalBackend(LLM(model=str(tiny_llama_dir), **ENGINE))
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


class Console:
    """Console errors and uncaught page errors of one page."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


class Traffic:
    """Greedy generation in a loop on a thread, until stopped."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.num_batches = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        while not self._stop.is_set():
            prompts = [[5 + i, 6, 7, 8 + self.num_batches % 50] for i in range(4)]
            self.backend.generate(prompts, [params] * 4, [None] * 4)
            self.num_batches += 1

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def http(url: str, method: str = "GET", key: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def chart_number(page, chart: str, field: str) -> float:
    return page.evaluate(f"() => Number(document.querySelector('[data-chart={chart}]')?.dataset.{field} || 0)")


def wait_chart(page, selector: str, field: str, above: float) -> None:
    page.wait_for_function(f"() => Number(document.querySelector({json.dumps(selector)})?.dataset.{field} || 0) > {above}")


def finetune_rows(count: int = 16, length: int = 24) -> list[dict]:
    return [{"input_ids": [(7 * i + j) % 900 + 3 for j in range(length)]} for i in range(count)]


# ---- the data routes, without a browser -------------------------------------------------------

def test_state_snapshot_has_history_engines_and_residency(server):
    status, body = http(f"{server.url}/dashboard/api/state")
    assert status == 200
    state = json.loads(body)
    assert state["server"] == {"model_id": "tiny-llama", "backend": "local", "auth": False}
    assert state["history"] and {"t", "tokens_per_s", "ttft_ms", "tpot_ms", "running", "waiting",
                                 "kv_usage"} <= set(state["history"][-1])
    engine = state["engines"]["local"]
    assert engine["budget"]["tpot_slo_ms"] == SLO_MS
    assert engine["budget"]["finetune_slo_headroom"] == HEADROOM
    profile = engine["latency_profile"]
    assert profile["points"]["forward"], "the profile's measured points are sent"
    # Backward windows timed at the end of a sequence come with that sequence's length and the key cost.
    assert profile["points"]["late_backward"] and profile["late_sequence_length"] > max(
        n for n, _ in profile["points"]["late_backward"])
    assert profile["backward_per_key"] >= 0
    assert engine["adapters"]["max_loras"] >= 1 and engine["adapters"]["device"] == {}
    assert state["workers"][0]["name"] == "local" and state["workers"][0]["healthy"] is True
    # `since` returns only newer samples.
    last = state["history"][-1]["t"]
    _, body = http(f"{server.url}/dashboard/api/state?since={last}")
    assert all(s["t"] > last for s in json.loads(body)["history"])


def test_adapter_residency_reaches_the_snapshot(server, backend, tiny_llama_dir, tmp_path):
    path = make_peft_adapter_dir(tiny_llama_dir, tmp_path / "sql", seed=1, r=4, target_modules=["q_proj"])
    backend.load_adapter("sql", path)
    try:
        backend.generate([[5, 6, 7]], [SamplingParams(max_tokens=2, temperature=0.0)], ["sql"])
        deadline = time.monotonic() + 10
        while True:   # the sampler reads once a second
            residency = json.loads(http(f"{server.url}/dashboard/api/state")[1])["engines"]["local"]["adapters"]
            if "sql" in residency["device"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert residency["device"] == {"sql": 0} and "sql" in residency["cpu"] and residency["on_disk"] == []
    finally:
        backend.unload_adapter("sql")


def test_assets_are_bundled_and_unknown_names_are_404(server):
    status, page = http(f"{server.url}/dashboard")
    assert status == 200 and 'data-auth="0"' in page
    assert "http://" not in page.replace('xmlns=\'http://www.w3.org/2000/svg\'', "") and "https://" not in page
    for name in ("app.js", "charts.js", "panels.js", "app.css"):
        status, body = http(f"{server.url}/dashboard/static/{name}")
        assert status == 200 and body and "cdn" not in body.lower()
    assert http(f"{server.url}/dashboard/static/..%2Fhistory.py")[0] == 404
    assert http(f"{server.url}/dashboard/api/jobs/no-such-job/cancel", method="POST")[0] == 404


def test_data_routes_need_the_key_when_set(make_server):
    server = make_server(api_key=API_KEY)
    status, page = http(f"{server.url}/dashboard")
    assert status == 200 and 'data-auth="1"' in page, "the page itself loads without a key"
    assert http(f"{server.url}/dashboard/api/state")[0] == 401
    assert http(f"{server.url}/dashboard/api/state", key="wrong")[0] == 401
    assert http(f"{server.url}/dashboard/api/jobs/x/cancel", method="POST")[0] == 401
    assert http(f"{server.url}/dashboard/api/state", key=API_KEY)[0] == 200


# ---- in the browser -------------------------------------------------------------------------

@needs_chromium
def test_dashboard_live_charts_loss_curve_and_cancel(server, backend, page, tmp_path):
    console = Console(page)
    page.goto(f"{server.url}/dashboard")
    wait_chart(page, "[data-chart=throughput]", "updates", 0)
    assert page.locator("#conn").get_attribute("data-state") == "live"
    # The SLO line and the measured latency profile are drawn from the first snapshot.
    assert page.locator("[data-chart=latency] [data-ref=slo]").count() == 1
    assert chart_number(page, "profile", "points") > 0
    legend = page.locator("[data-chart=profile]").inner_text()
    assert "backward window" in legend and "backward at the end of 64 tokens" in legend
    # The pace finetuning keeps decodes at: the limit less the headroom.
    facts = page.locator("#budget-facts").inner_text()
    assert f"Finetuning pace\n{(1 - HEADROOM) * SLO_MS:.0f} ms" in facts

    points_before = chart_number(page, "throughput", "points")
    with Traffic(backend) as traffic:
        # Charts update while traffic runs: more samples, and inference tokens/s above zero.
        wait_chart(page, "[data-chart=throughput]", "points", points_before + 3)
        wait_chart(page, "[data-chart=throughput]", "max", 0)
        wait_chart(page, "[data-chart=latency]", "points", 0)
        assert traffic.num_batches > 0

        job_id = backend.finetune(FinetuneConfig(adapter="dash-ft", peft=LORA, dataset=finetune_rows(),
                                                 max_steps=400, batch_size=2, max_seq_len=64))
        job = f'[data-job-id="{job_id}"]'
        # Its loss curve appears and grows, and its adapter shows as training in the adapters panel.
        wait_chart(page, f"{job} [data-chart=loss]", "points", 1)
        page.wait_for_selector('#adapters tr[data-adapter="dash-ft"] .tag')
        assert page.locator(f"{job} .status").inner_text() == "running"

        # Cancel from the page: the first click arms the button, the second cancels.
        button = page.locator(f"{job} button.cancel")
        button.click()
        assert button.inner_text() == "Confirm cancel"
        button.click()
        page.wait_for_function(f"() => document.querySelector('{job} .status')?.textContent === 'cancelled'")
        assert backend.job(job_id)["status"] == "cancelled"
        page.wait_for_selector(f"{job} button.cancel", state="hidden")
        # Later polls keep it cancelled (a stats read begun before the cancel must not flip it back).
        wait_chart(page, "[data-chart=throughput]", "updates", chart_number(page, "throughput", "updates") + 1)
        assert page.locator(f"{job} .status").inner_text() == "cancelled"

    assert page.locator('#workers tr[data-worker="local"] .health.ok').count() == 1
    page.click("[data-range='60']")   # the test's history is short: a 1-minute window reads better
    assert page.locator("[data-range='60']").get_attribute("class") == "on"
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"dashboard screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    assert console.errors == []


@needs_chromium
def test_outage_banner_then_recovery(server, page):
    console = Console(page)
    page.goto(f"{server.url}/dashboard")
    wait_chart(page, "[data-chart=throughput]", "updates", 0)
    # The server becomes unreachable: a banner says so and the charts keep their data.
    page.route("**/dashboard/api/state*", lambda route: route.abort())
    page.wait_for_selector("#banner[data-kind=error]", state="visible")
    assert "unreachable" in page.locator("#banner").inner_text()
    assert page.locator("#conn").get_attribute("data-state") == "offline"
    assert chart_number(page, "throughput", "points") > 0
    page.unroute("**/dashboard/api/state*")
    page.wait_for_function("() => document.querySelector('#conn').dataset.state === 'live'")
    assert page.locator("#banner").inner_text() == "Reconnected."
    page.wait_for_selector("#banner", state="hidden")
    # Only the failed loads of the outage itself may be logged.
    assert [e for e in console.errors if "ERR_FAILED" not in e] == []


@needs_chromium
def test_page_asks_for_the_key_and_works_after_it(make_server, page):
    server = make_server(api_key=API_KEY)
    console = Console(page)
    page.goto(f"{server.url}/dashboard")
    page.wait_for_selector("#key-dialog", state="visible")
    assert page.locator("#conn").get_attribute("data-state") in ("connecting", "locked")

    page.fill("#key-input", "not-the-key")
    page.press("#key-input", "Enter")
    page.wait_for_function("() => document.querySelector('#key-error').textContent.includes('refused')")
    page.fill("#key-input", API_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#key-dialog", state="hidden")
    wait_chart(page, "[data-chart=throughput]", "updates", 0)
    assert page.locator("#conn").get_attribute("data-state") == "live"
    assert page.evaluate("() => sessionStorage.getItem('coserve.dashboard.apiKey')") == API_KEY
    # The refused key's 401 is the only error the browser may log.
    assert [e for e in console.errors if "401" not in e] == []
