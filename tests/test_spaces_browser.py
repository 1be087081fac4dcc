"""The Spaces demo end to end in headless Chromium: upload a photo, run, read the result back from the page.

Needs Debian's `chromium` and `chromium-driver` (installed by .ci/run). In CI (the `CI` environment variable set)
the test fails when they are missing; elsewhere it is skipped, saying how to install them.
"""

import base64
import io
import json
import os
import shutil
import urllib.parse

import numpy as np
import PIL.Image
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from test_spaces import PHOTO, load_app, serving

INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"
STEPS = 3
WAIT_SECONDS = 60

# Read an <img>'s file the way the page does, as a data: URL.
FETCH_AS_DATA_URL = """
const done = arguments[arguments.length - 1];
fetch(arguments[0]).then(response => response.blob()).then(blob => {
    const reader = new FileReader();
    reader.onload = () => done(reader.result);
    reader.readAsDataURL(blob);
}).catch(error => done('error: ' + error));
"""


def chromium_paths():
    """The Chromium browser and its WebDriver; without them a skip on a developer's machine, a failure in CI.

    CI must run the browser test (a missing browser there is a broken CI set-up, not a reason to pass), while a
    contributor without Chromium still gets a green run and the command that installs it.
    """
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if browser is None or not os.path.isfile(driver):
        message = f"headless Chromium and its WebDriver are needed for this test; install them with: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set: the browser test must run)")
        pytest.skip(message)
    return browser, driver


@pytest.mark.parametrize("ci", [None, "true"])
def test_missing_chromium_skips_only_outside_ci(monkeypatch, ci):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os.path, "isfile", lambda path: False)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    expected = pytest.skip.Exception if ci is None else pytest.fail.Exception
    with pytest.raises(expected, match="apt-get install -y chromium chromium-driver"):
        chromium_paths()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        "--disable-dev-shm-usage",
        "--window-size=1280,1600",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}",
    ):
        options.add_argument(argument)
    # The performance log lists every request the page makes, to check that nothing leaves the machine.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    chrome = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    chrome.set_script_timeout(WAIT_SECONDS)
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    examples = load_app().example_images()
    with serving(tmp_path_factory.mktemp("space"), default_steps=STEPS, examples=examples) as (app, pipeline, _, url):
        yield app, pipeline, url


def open_and_upload(browser, url, path):
    """Load the demo page, upload `path` into the image input and press the button."""
    browser.get(url)
    wait = WebDriverWait(browser, WAIT_SECONDS)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "input[type=file]"))
    browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))
    # The upload is done when the input shows it (a broken picture for a file that is no image).
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "img[src*='gradio_api/file=']"))
    browser.find_element(By.ID, "run").click()
    return wait


def test_upload_run_and_read_back_the_result(browser, page):
    app, pipeline, url = page
    wait = open_and_upload(browser, url, PHOTO)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#gallery img[alt^='SR3']"))

    info = browser.find_element(By.ID, "info").text
    assert "16x16 → 64x64" in info and f"ddim, {STEPS} steps, seed 0" in info
    captions = [img.get_attribute("alt") for img in browser.find_elements(By.CSS_SELECTOR, "#gallery img")]
    assert captions == ["input 16x16 (nearest neighbour)", "bicubic 64x64", "SR3 64x64"]

    image = browser.find_element(By.CSS_SELECTOR, "#gallery img[alt^='SR3']")
    wait.until(lambda b: image.get_property("complete") and image.get_property("naturalWidth") > 0)
    assert (image.get_property("naturalWidth"), image.get_property("naturalHeight")) == (64, 64)
    data_url = browser.execute_async_script(FETCH_AS_DATA_URL, image.get_attribute("src"))
    assert data_url.startswith("data:image/png;base64,"), data_url[:100]
    shown = PIL.Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")
    assert shown.size == (64, 64)

    # What the page shows is the app's result for the page's defaults (ddim, STEPS steps, seed 0).
    expected = app.super_resolve(pipeline, PIL.Image.open(PHOTO).convert("RGB"), 4, STEPS, "ddim", seed=0).sr3
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(expected))

    # Offline: every request the page made went to the demo's own server.
    server = urllib.parse.urlsplit(url).netloc
    requested = {
        message["params"]["request"]["url"]
        for message in (json.loads(entry["message"])["message"] for entry in browser.get_log("performance"))
        if message["method"] == "Network.requestWillBeSent"
    }
    outside = {
        address
        for address in requested
        if urllib.parse.urlsplit(address).scheme in ("http", "https", "ws", "wss")
        and urllib.parse.urlsplit(address).netloc != server
    }
    assert any(urllib.parse.urlsplit(address).netloc == server for address in requested)
    assert not outside, f"the page fetched from outside the demo server: {sorted(outside)}"


def test_a_file_that_is_no_image_gets_a_clear_message(browser, page, tmp_path):
    _, _, url = page
    fake = tmp_path / "notes.png"
    fake.write_text("this is a text file with a .png name\n", encoding="utf-8")
    wait = open_and_upload(browser, url, fake)
    message = "notes.png is not an image this demo can read"
    wait.until(lambda b: message in b.find_element(By.TAG_NAME, "body").text)
    assert not browser.find_elements(By.CSS_SELECTOR, "#gallery img")


def test_on_a_phone_the_page_fits_and_the_results_follow_the_button(browser, page):
    """At a phone's width the columns stack: the examples sat between the button and the results, pushing the results
    further out of sight of the button. The page must not scroll sideways either, and the pictures carry alt text."""
    _, _, url = page
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 375, "height": 740, "deviceScaleFactor": 2, "mobile": True}
    )
    try:
        wait = open_and_upload(browser, url, PHOTO)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#gallery img[alt^='SR3']"))
        page_width, viewport_width = browser.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        assert viewport_width == 375 and page_width <= viewport_width
        button, gallery = browser.find_element(By.ID, "run").rect, browser.find_element(By.ID, "gallery").rect
        assert gallery["x"] < button["x"] + button["width"] and gallery["y"] > button["y"]  # stacked: a phone layout
        # Only the run's one-line summary between them (79 px here; 201 with the examples in between).
        assert gallery["y"] - (button["y"] + button["height"]) < 120
        uploaded = browser.find_elements(By.CSS_SELECTOR, "img[alt='the photo to super-resolve']")
        assert uploaded and uploaded[0].is_displayed()
        examples = [element.accessible_name for element in browser.find_elements(By.CSS_SELECTOR, "button")]
        assert "a cat, 96x64" in examples
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_an_example_photo_named_in_text_loads_into_the_upload_and_runs(browser, page):
    """The examples are text buttons now (their names, for screen readers): clicking one must still load its photo
    into the upload. On a desktop the results stay beside the settings, and Tab goes upload, examples, settings,
    button."""
    _, _, url = page
    browser.get(url)
    wait = WebDriverWait(browser, WAIT_SECONDS)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "input[type=file]"))
    button, gallery = browser.find_element(By.ID, "run").rect, browser.find_element(By.ID, "gallery").rect
    assert gallery["x"] >= button["x"] + button["width"]  # side by side
    browser.find_element(By.TAG_NAME, "body").click()
    order = []
    while not order or order[-1] != "Super-resolve":
        browser.switch_to.active_element.send_keys(Keys.TAB)
        order.append(browser.switch_to.active_element.accessible_name)
        assert len(order) < 40, order
    examples = ["an astronaut's portrait, 64x64", "a cat, 96x64", "a cup of coffee, 96x64"]
    first = order.index(examples[0])
    assert order[first : first + 3] == examples
    assert order.index("Upload file") < first and order.index("x4") > first + 2
    next(
        element for element in browser.find_elements(By.TAG_NAME, "button") if element.accessible_name == examples[1]
    ).click()
    wait.until(
        lambda b: b.find_elements(By.CSS_SELECTOR, "img[src$='chelsea_96x64.png'][alt='the photo to super-resolve']")
    )
    browser.find_element(By.ID, "run").click()
    wait.until(lambda b: "96x64 → 384x256" in b.find_element(By.ID, "info").text)


def test_an_animation_says_in_the_page_that_only_its_first_frame_is_upscaled(browser, page, tmp_path):
    """`gr.Warning` is called in the worker thread that runs the request: it must reach the page as a notice."""
    _, _, url = page
    first = PIL.Image.open(PHOTO).convert("RGB")
    first.save(tmp_path / "clip.gif", save_all=True, append_images=[first.rotate(90)])
    wait = open_and_upload(browser, url, tmp_path / "clip.gif")
    message = "clip.gif has 2 frames (an animation or a multi-page file): only the first is upscaled"
    wait.until(lambda b: message in b.find_element(By.TAG_NAME, "body").text)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#gallery img[alt^='SR3']"))
