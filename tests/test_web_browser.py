"""`vramcalc web` in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

Claims: filling the form for three setups shows the total that `vramcalc estimate --format json` prints, to the byte;
the shareable URL restores every field; a bad value gets its message beside its field; user-provided names are shown
as text, never as markup; the tables sort on a header click; the CSV download is the CLI's file; at 1280x800 the
form, the bar chart and the GPU table are all on screen without overlapping (screenshots under the test's tmp_path).
Skipped, with the reason, where chromium, chromedriver or selenium is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

pytest.importorskip("pandas")  # the page's plan table comes from vramcalc.plan
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install 'vramcalc[test]'")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

from vramcalc.web.server import make_server  # noqa: E402

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Chromium and its driver: apt-get install chromium chromium-driver",
)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,800")
WIDTH, HEIGHT = 1280, 800

SETUPS = [  # the form fields to set, in order (method first: it decides which fields are shown)
    {"model": "llama-3.1-8b", "gpu": "rtx-4090", "method": "lora", "seq_len": 4096, "grad_ckpt": "full",
     "lora_targets": "all-linear"},
    {"model": "qwen3-8b", "gpu": "a100-40gb", "method": "qlora", "precision": "mixed-bf16", "batch_size": 4,
     "lora_rank": 64, "double_quant": False},
    {"model": "llama-3.1-70b", "gpu": "h100-sxm", "method": "full", "optimizer": "adamw-8bit", "num_gpus": 8,
     "sharding": "fsdp", "attn": "flash"},
]


@pytest.fixture(scope="module")
def server():
    server = make_server("127.0.0.1", 0, rate_per_s=1000.0, burst=1000)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    profile = tempfile.mkdtemp(prefix="vramcalc-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_idle(driver, timeout_s: float = 60.0) -> None:
    """Until the page has the answers for its last change (body[data-busy] back to "0")."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if driver.execute_script("return document.body.dataset.busy") == "0":
            time.sleep(0.3)  # a debounced change may still be on its way
            if driver.execute_script("return document.body.dataset.busy") == "0":
                return
        time.sleep(0.1)
    raise AssertionError("the page did not finish computing: " + driver.find_element(By.ID, "status").text)


def open_page(driver, server, query: str = "") -> None:
    driver.get(server.url + query)
    wait_idle(driver)


def fill(driver, setup: dict) -> None:
    for name, value in setup.items():
        element = driver.find_element(By.ID, f"f-{name}")
        if element.tag_name == "select":
            Select(element).select_by_value(str(value))
        elif element.get_attribute("type") == "checkbox":
            if element.is_selected() != bool(value):
                element.click()
        else:
            element.clear()
            element.send_keys(str(value))
    wait_idle(driver)


def page_total_bytes(driver) -> int:
    text = driver.find_element(By.ID, "total-bytes").text
    assert re.fullmatch(r"\([\d,]+ bytes\)", text), text
    return int(re.sub(r"\D", "", text))


def cli_json(setup: dict) -> dict:
    argv = [sys.executable, "-m", "vramcalc", "estimate", setup["model"], "--format", "json"]
    for name, value in setup.items():
        if name == "model":
            continue
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else ["--no-" + flag[2:]] if value is False else [flag, str(value)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def rect(driver, selector: str) -> dict:
    return driver.execute_script("const r = document.querySelector(arguments[0]).getBoundingClientRect();"
                                 "return {left: r.left, right: r.right, top: r.top, bottom: r.bottom};", selector)


@pytest.mark.parametrize("index", range(len(SETUPS)))
def test_the_page_total_is_the_cli_total_to_the_byte(browser, server, tmp_path, index):
    setup = SETUPS[index]
    open_page(browser, server)
    fill(browser, setup)
    assert browser.find_element(By.ID, "error-banner").get_attribute("hidden") is not None
    assert page_total_bytes(browser) == cli_json(setup)["total_bytes"]
    shot = tmp_path / f"setup-{index}.png"
    browser.save_screenshot(str(shot))
    assert png_size(shot) == (WIDTH, HEIGHT)


def test_form_bar_and_gpu_table_are_on_screen_without_overlap(browser, server, tmp_path):
    open_page(browser, server, "?model=llama-3.1-8b&method=lora&gpu=rtx-4090")
    form, bar, fits = rect(browser, "#form"), rect(browser, "#bar"), rect(browser, "#fits-table")
    assert form["right"] <= bar["left"] and form["right"] <= fits["left"]  # side by side
    assert bar["bottom"] <= fits["top"]  # the chart above the table
    assert fits["top"] < HEIGHT - 100 and bar["bottom"] < HEIGHT and form["bottom"] <= HEIGHT
    assert bar["right"] <= WIDTH and fits["left"] < WIDTH
    rows = browser.find_elements(By.CSS_SELECTOR, "#fits-table tbody tr")
    assert len(rows) >= 10
    browser.save_screenshot(str(tmp_path / "page.png"))


def test_the_page_runs_under_its_content_security_policy_without_console_errors(browser, server):
    browser.get_log("browser")  # drop what earlier tests left
    open_page(browser, server, "?model=qwen3-8b&method=lora&gpu=l40s")
    errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
    assert browser.find_elements(By.CSS_SELECTOR, "#bar rect.c0"), "no bar was drawn"


def test_the_shareable_url_restores_every_field(browser, server):
    setup = SETUPS[1]
    open_page(browser, server)
    fill(browser, setup)
    total = page_total_bytes(browser)
    url = browser.find_element(By.ID, "share-url").get_attribute("value")
    open_page(browser, server, "")
    assert page_total_bytes(browser) != total
    browser.get(url)
    wait_idle(browser)
    assert page_total_bytes(browser) == total
    for name, value in setup.items():
        element = browser.find_element(By.ID, f"f-{name}")
        if element.get_attribute("type") == "checkbox":
            assert element.is_selected() == value, name
        else:
            assert element.get_attribute("value") == str(value), name


def test_a_bad_value_gets_its_message_beside_the_field(browser, server):
    open_page(browser, server)
    fill(browser, {"batch_size": 0})
    message = browser.find_element(By.ID, "err-batch_size").text
    assert "batch size" in message and "Traceback" not in message
    assert "invalid" in browser.find_element(By.ID, "f-batch_size").get_attribute("class")
    fill(browser, {"model": "llama-9000", "batch_size": 2})
    assert "closest" in browser.find_element(By.ID, "err-model").text
    assert browser.find_element(By.ID, "err-batch_size").text == ""


def test_user_provided_names_are_shown_as_text_not_markup(browser, server, tmp_path):
    config = {"model_type": "llama", "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
              "intermediate_size": 1024, "vocab_size": 1000}
    path = tmp_path / "<img src=x onerror=window.pwned=1>.json"
    path.write_text(json.dumps(config))
    open_page(browser, server)
    browser.find_element(By.ID, "f-config").send_keys(str(path))
    wait_idle(browser)
    assert "<img src=x onerror=window.pwned=1>" in browser.find_element(By.ID, "phase").text
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0
    assert browser.execute_script("return window.pwned === undefined")


def test_clicking_a_header_sorts_the_gpu_table(browser, server):
    open_page(browser, server, "?model=llama-3.1-8b&method=lora")
    header = browser.find_element(By.CSS_SELECTOR, "#fits-table th[data-key=memory_gib]")

    def column():
        return [float(td.text) for td in browser.find_elements(By.CSS_SELECTOR, "#fits-table tbody td:nth-child(2)")]

    header.click()
    assert column() == sorted(column())
    browser.find_element(By.CSS_SELECTOR, "#fits-table th[data-key=memory_gib]").click()
    assert column() == sorted(column(), reverse=True)


def test_the_csv_download_is_the_cli_plan_file(browser, server, tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    open_page(browser, server, "?model=llama-3.1-8b&method=lora&tokens=200000000")
    browser.find_element(By.ID, "download-csv").click()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not [p for p in downloads.glob("*.csv")]:
        time.sleep(0.2)
    files = list(downloads.glob("*.csv"))
    assert files, "no CSV was downloaded"
    subprocess.run([sys.executable, "-m", "vramcalc", "plan", "llama-3.1-8b", "--method", "lora", "--tokens",
                    "200000000", "--output", str(tmp_path / "cli.csv")], check=True, capture_output=True)
    assert files[0].read_bytes() == (tmp_path / "cli.csv").read_bytes()


def cli_plan_table(*argv: str) -> tuple[list[str], list[dict]]:
    """The headers and rows of the table that `vramcalc plan ARGV` prints, cut at the headers' offsets (every
    column is left-aligned and as wide as its widest cell, so a cell starts where its header starts)."""
    done = subprocess.run([sys.executable, "-m", "vramcalc", "plan", *argv], capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    start = lines.index("") + 1
    header, body = lines[start], lines[start + 1:lines.index("", start)]
    spans = [match.span() for match in re.finditer(r"\S+", header)]
    names = [header[a:b] for a, b in spans]
    edges = [a for a, _ in spans] + [None]
    rows = [{name: line[edges[i]:edges[i + 1]].strip() for i, name in enumerate(names)} for line in body]
    return names, rows


def page_plan_table(driver) -> tuple[list[str], list[dict]]:
    """The page's plan table: its header texts and its rows as {data-key: cell text}."""
    return driver.execute_script("""
        const table = document.getElementById("plan-table");
        const heads = [...table.tHead.rows[0].cells];
        const rows = [...table.tBodies[0].rows].map((tr) =>
            Object.fromEntries(heads.map((th, i) => [th.dataset.key, tr.cells[i].textContent])));
        return [heads.map((th) => th.textContent), rows];""")


def test_the_plan_table_shows_the_cli_plan_table(browser, server):
    open_page(browser, server, "?model=llama-3.1-70b&method=full")
    assert browser.find_element(By.ID, "error-banner").get_attribute("hidden") is not None
    page_headers, page_rows = page_plan_table(browser)
    cli_headers, cli_rows = cli_plan_table("llama-3.1-70b", "--method", "full")
    assert page_headers == cli_headers
    assert "parallelism" in page_headers and "throughput_tokens_per_s" in page_headers
    page_blank = {"-": "–"}  # the CLI's "-" (none, never 0) is "–" on the page
    assert [(row["rank"], row["gpu"]) for row in page_rows] == [
        (page_blank.get(row["rank"], row["rank"]), page_blank.get(row["gpu"], row["gpu"])) for row in cli_rows]
    by_gpu = {row["gpu"]: row for row in page_rows if row["offer"] == "gpu"}
    several = [row for row in cli_rows if row["offer"] == "gpu" and int(row["num_gpus"]) > 1]
    assert several, "a 70B full fine-tune should need several GPUs somewhere"
    for row in several:  # e.g. "fsdp x8", "tp 2 x dp 64 (fsdp), grad ckpt full (plan)"
        page = by_gpu[row["gpu"]]
        assert page["parallelism"] == row["parallelism"], row["gpu"]
        # the same figures, each side rounded its own way: host RAM to 0.1 GiB on the page, tokens/s to a token
        for key, page_step in (("host_ram_gib", 0.05), ("throughput_tokens_per_s", 0.5)):
            assert (page[key] == "–") == (row[key] == "-"), (row["gpu"], key)
            if row[key] != "-":
                shown, printed = float(page[key].replace(",", "")), float(row[key].replace(",", ""))
                assert abs(shown - printed) <= page_step + 0.05, (row["gpu"], key, page[key], row[key])
                assert re.fullmatch(r"\d{1,3}(,\d{3})*" + (r"\.\d" if key.endswith("_gib") else ""), page[key])


def test_clicking_a_plan_header_sorts_its_numbers_as_numbers(browser, server):
    open_page(browser, server, "?model=llama-3.1-70b&method=full")

    def column(key):
        cells = [row[key] for row in page_plan_table(browser)[1]]
        numbers = [float(text.replace(",", "")) for text in cells if text != "–"]
        assert cells[len(numbers):] == ["–"] * (len(cells) - len(numbers)), "blanks go last"
        return numbers

    browser.find_element(By.CSS_SELECTOR, "#plan-table th[data-key=throughput_tokens_per_s]").click()
    speeds = column("throughput_tokens_per_s")
    assert len(speeds) >= 5 and speeds == sorted(speeds)
    assert len({len(f"{speed:,.0f}") for speed in speeds}) > 1  # numbers of several widths: text order would differ
    browser.find_element(By.CSS_SELECTOR, "#plan-table th[data-key=throughput_tokens_per_s]").click()
    assert column("throughput_tokens_per_s") == sorted(speeds, reverse=True)
    browser.find_element(By.CSS_SELECTOR, "#plan-table th[data-key=num_gpus]").click()
    assert column("num_gpus") == sorted(column("num_gpus"))


def test_the_plan_has_hours_exactly_when_the_form_gives_a_token_budget(browser, server):
    open_page(browser, server, "?model=llama-3.1-8b&method=lora")
    assert browser.find_element(By.ID, "f-tokens").get_attribute("value") == ""  # as the CLI without --tokens
    hours = [row["train_hours"] for row in page_plan_table(browser)[1]]
    assert hours and set(hours) == {"–"}
    fill(browser, {"tokens": "1e9"})
    assert "tokens=1e9" in browser.find_element(By.ID, "share-url").get_attribute("value")
    hours = [row["train_hours"] for row in page_plan_table(browser)[1] if row["train_hours"] != "–"]
    assert len(hours) >= 5 and all(float(text.replace(",", "")) > 0 for text in hours)


LENGTHS_QUERY = {"model": "llama-2-7b", "stack": "torchtune", "method": "lora", "batch_size": 2, "seq_len": 512,
                 "loss": "torchtune-2024", "precision": "bf16-true", "grad_ckpt": "full"}


def test_an_uploaded_length_file_changes_the_estimate_to_the_cli_one(browser, server, tmp_path):
    """The dataset's lengths, uploaded as the 'tokens,samples' CSV `vramcalc lengths --output` writes: the total
    becomes `vramcalc estimate --sample-lengths FILE`'s (the longest sample, 333 tokens, is under seq_len 512, so the
    peak drops), the page says what the CLI prints under its table; a bad file gets its message beside the input and
    the form stays as it was."""
    lengths = tmp_path / "histogram.csv"
    lengths.write_text("tokens,samples\n100,600\n200,300\n300,100\n333,1\n")
    query = "?" + "&".join(f"{key}={value}" for key, value in LENGTHS_QUERY.items())
    open_page(browser, server, query)
    without = page_total_bytes(browser)
    assert without == cli_json(LENGTHS_QUERY)["total_bytes"]
    assert browser.find_element(By.ID, "lengths-note").text == ""
    browser.find_element(By.ID, "f-sample_lengths").send_keys(str(lengths))
    wait_idle(browser)
    done = subprocess.run([sys.executable, "-m", "vramcalc", "estimate", "llama-2-7b", "--stack", "torchtune",
                           "--method", "lora", "--batch-size", "2", "--seq-len", "512", "--loss", "torchtune-2024",
                           "--precision", "bf16-true", "--grad-ckpt", "full", "--sample-lengths", str(lengths),
                           "--format", "json"], capture_output=True, text=True, check=True)
    expected = json.loads(done.stdout)
    assert browser.find_element(By.ID, "error-banner").get_attribute("hidden") is not None
    assert page_total_bytes(browser) == expected["total_bytes"] < without
    note = browser.find_element(By.ID, "lengths-note").text
    assert "1,001 samples" in note and "longest step 333 tokens" in note and "501 steps an epoch" in note
    assert f"{expected['details']['length_ladders_bytes'] / 2**30:.2f} GiB more cached" in note
    assert "histogram.csv" in browser.find_element(By.ID, "lengths-name").text
    browser.save_screenshot(str(tmp_path / "lengths.png"))
    assert "length file is not in the link" in browser.find_element(By.ID, "share-url").get_attribute("value")

    bad = tmp_path / "bad.csv"
    bad.write_text("tokens,samples\n100,-1\n")
    browser.find_element(By.ID, "f-sample_lengths").send_keys(str(bad))
    wait_idle(browser)
    message = browser.find_element(By.ID, "err-sample_lengths").text
    assert "must be positive" in message and "Traceback" not in message
    assert browser.find_element(By.ID, "f-seq_len").get_attribute("value") == "512"  # nothing lost
    browser.find_element(By.ID, "lengths-clear").click()
    wait_idle(browser)
    assert browser.find_element(By.ID, "err-sample_lengths").text == ""
    assert page_total_bytes(browser) == without and browser.find_element(By.ID, "lengths-note").text == ""
