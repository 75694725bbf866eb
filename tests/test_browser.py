"""The page in a real browser: headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium) types a prompt, clicks Generate, waits for the image in the
gallery and checks its pixels, the live preview, "use these settings" and the
download link; the same again through the access-token login.

Skips only when Chromium is not installed (``scripts/install-browser.sh`` installs it).

Environment: ``CPUFLOW_SCREENSHOT=docs/serve.png`` also saves the page after the
generation there (palette PNG, small); ``CPUFLOW_SERVE_MODEL=DIR`` (or ``default``
for the shipped model) serves a real exported model instead of the fake pipeline
(the pixel check is then skipped), e.g. to remake docs/serve.png.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="Chromium is not installed (needs Debian packages chromium and chromium-driver: "
           "run scripts/install-browser.sh)")

from cpuflow.server.app import create_app  # noqa: E402
from PIL import Image  # noqa: E402
from test_server import FakePipeline, colour_of  # noqa: E402

TOKEN = "browser-test-token-0123456789"
PROMPT = "a red circle on a blue background"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1100,760", "--hide-scrollbars", "--force-device-scale-factor=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, models, **kw):
        import uvicorn
        self.port = _free_port()
        self.app = create_app(models, port=self.port, **kw)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="error", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 20, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(5)
        self.app.state.jobs.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _models():
    """The shipped (trained) model when it is built, so the browser test checks a
    real picture; CPUFLOW_SERVE_MODEL=fake forces the fake pipeline, a path another model."""
    from cpuflow.pipelines.model import shipped_model_dir
    real = os.environ.get("CPUFLOW_SERVE_MODEL")
    if real is None and (shipped_model_dir() / "cpuflow.json").exists():
        real = "default"
    if real and real != "fake":
        return {"default" if real == "default" else Path(real).name: None if real == "default" else real}, True
    return {"fake": FakePipeline(step_delay=0.08)}, False


def _wait(driver, script: str, timeout: float = 60.0):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(script))


def _generate(driver, steps: int, seed: int) -> None:
    from selenium.webdriver.common.by import By
    _wait(driver, "return document.getElementById('model').options.length > 0")
    driver.find_element(By.ID, "prompt").send_keys(PROMPT)
    steps_box = driver.find_element(By.ID, "steps")
    steps_box.clear()
    steps_box.send_keys(str(steps))
    driver.find_element(By.ID, "seed-random").click()
    driver.find_element(By.ID, "seed").send_keys(str(seed))
    driver.find_element(By.ID, "generate").click()
    _wait(driver, "const i = document.querySelector('#gallery .card img');"
                  "return i !== null && i.complete && i.naturalWidth > 0", timeout=120)


def _pixel(driver, x: int, y: int) -> list[int]:
    return driver.execute_script(
        "const i = document.querySelector('#gallery .card img'); const c = document.createElement('canvas');"
        "c.width = i.naturalWidth; c.height = i.naturalHeight; const g = c.getContext('2d');"
        "g.drawImage(i, 0, 0); return Array.from(g.getImageData(arguments[0], arguments[1], 1, 1).data);", x, y)


def _no_console_errors(driver) -> None:
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors          # a CSP violation (blocked inline script/style) would show here


def _save_screenshot(driver, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    target = os.environ.get("CPUFLOW_SCREENSHOT")
    shot = tmp_path / "serve.png"
    if target:  # a fuller gallery for the README: three more images of the same prompt
        n = driver.find_element(By.ID, "n")
        n.clear()
        n.send_keys("3")
        driver.find_element(By.ID, "generate").click()
        _wait(driver, "return document.querySelectorAll('#gallery .card img').length >= 4 && "
                      "Array.from(document.querySelectorAll('#gallery .card img')).every(i => i.complete)",
              timeout=300)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1100, "height": 700, "deviceScaleFactor": 1, "mobile": False})
        driver.execute_script("window.scrollTo(0, 0); document.activeElement.blur();")
    driver.save_screenshot(str(shot))
    if target:
        from PIL import Image
        img = Image.open(shot).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        img.save(target, optimize=True)


def test_generate_in_the_browser(browser, tmp_path):
    from selenium.webdriver.common.by import By
    models, real = _models()
    with LiveServer(models) as srv:
        browser.get(srv.url + "/")
        assert browser.title == "cpuflow"
        steps = 20 if real else 8
        _generate(browser, steps=steps, seed=42)
        card = browser.find_element(By.CSS_SELECTOR, "#gallery .card")
        assert PROMPT in card.text and "seed 42" in card.text and f"{steps} steps" in card.text
        _wait(browser, "return document.getElementById('status').textContent.startsWith('Done')")
        assert int(browser.execute_script("return document.getElementById('preview').dataset.shown || 0")) >= 1
        assert browser.execute_script("return document.getElementById('preview').src") == \
            browser.find_element(By.CSS_SELECTOR, "#gallery .card img").get_attribute("src")   # then the result
        img = browser.find_element(By.CSS_SELECTOR, "#gallery .card img")
        link = card.find_element(By.LINK_TEXT, "Download")
        assert link.get_attribute("href") == img.get_attribute("src") and link.get_attribute("download")
        assert img.get_attribute("src").startswith(srv.url + "/api/images/")
        if not real:
            assert _pixel(browser, 2, 2)[:3] == list(colour_of(PROMPT, 42))      # the image the server made
            assert _pixel(browser, 32, 32)[:3] == [255, 255, 255]
        elif list(models) == ["default"]:
            # the trained model: the picture in the gallery must show what the prompt asks
            import io
            import urllib.request
            from cpuflow.toyworld import evaluate, parse_prompt
            with urllib.request.urlopen(img.get_attribute("src")) as r:
                verdict = evaluate(Image.open(io.BytesIO(r.read())), parse_prompt(PROMPT))
            assert all(verdict.values()), verdict
        _save_screenshot(browser, tmp_path)
        # "use these settings again"
        browser.find_element(By.ID, "prompt").clear()
        card.find_element(By.XPATH, ".//button[text()='Use again']").click()
        assert browser.find_element(By.ID, "prompt").get_attribute("value") == PROMPT
        assert browser.find_element(By.ID, "seed").get_attribute("value") == "42"
        assert not browser.find_element(By.ID, "seed-random").is_selected()
        _no_console_errors(browser)


def test_token_login_and_init_image_in_the_browser(browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    init = tmp_path / "init.png"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(init)
    with LiveServer({"fake": FakePipeline(step_delay=0.01)}, token=TOKEN) as srv:
        browser.get(srv.url + "/")
        assert "access token" in browser.page_source                # no cookie yet: the login hint
        browser.get(srv.url + "/?token=" + TOKEN)
        assert browser.current_url == srv.url + "/"                 # the token left the address bar
        _wait(browser, "return document.getElementById('model').options.length > 0")
        browser.find_element(By.ID, "init").send_keys(str(init))   # img2img: the upload goes as base64 JSON
        _generate(browser, steps=3, seed=7)                         # fetch + EventSource work with the cookie
        text = browser.find_element(By.CSS_SELECTOR, "#gallery .card").text
        # #16 item 3: a 300x200 photo works at the model's area (64x64) with its own shape, cropped
        assert "seed 7" in text and "img2img strength 0.8" in text and "80×56" in text, text
        assert _pixel(browser, 2, 2)[:3] == list(colour_of(PROMPT, 7))
        # without "photo's aspect ratio" the Width x Height fields (the model's 64x64) are the size
        browser.find_element(By.ID, "photo-aspect").click()
        browser.find_element(By.ID, "generate").click()
        _wait(browser, "return document.querySelectorAll('#gallery .card img').length >= 2 && "
                       "[...document.querySelectorAll('#gallery .card img')].every(i => i.complete && i.naturalWidth > 0)",
              timeout=120)
        text = browser.find_element(By.CSS_SELECTOR, "#gallery .card").text
        assert "64×64" in text, text
        assert browser.execute_script("return document.cookie") == ""   # HttpOnly: scripts cannot read it
        browser.get_log("browser")   # the first visit's 401 is logged on purpose; clear it


class _MaskRecorder(FakePipeline):
    """The fake pipeline, keeping the mask each request carried (PNG bytes) and its inpaint options."""

    def __init__(self):
        super().__init__(step_delay=0.01)
        self.masks: list = []

    def __call__(self, req, progress=None):
        self.masks.append(None if req.mask is None else (bytes(req.mask), req.inpaint_area, req.mask_blur))
        return super().__call__(req, progress)


def test_paint_a_mask_over_the_init_image(browser, tmp_path):
    """Inpainting in the page: the init image appears under a canvas; a brush stroke paints the
    mask white, the eraser takes part of it back, and the request carries that mask as a PNG at the
    picture's size; "Clear mask" empties it (then no mask is sent)."""
    import io

    import numpy as np
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(init)
    pipe = _MaskRecorder()
    with LiveServer({"fake": pipe}) as srv:
        browser.get(srv.url + "/")
        _wait(browser, "return document.getElementById('model').options.length > 0")
        browser.find_element(By.ID, "init").send_keys(str(init))
        _wait(browser, "return document.getElementById('mask-box').className === '' && "
                       "document.getElementById('mask-canvas').width === 64")
        canvas = browser.find_element(By.ID, "mask-canvas")
        shown = canvas.size["width"]                       # CSS pixels; the picture is 64 wide
        scale = shown / 64
        browser.execute_script("const b = document.getElementById('brush'); b.value = arguments[0];"
                               "b.dispatchEvent(new Event('input'));", int(8 * scale))   # 8 picture pixels wide

        def stroke(x0, y0, x1, y1):   # picture pixels -> offsets from the canvas centre
            off = lambda v: int((v - 32) * scale)  # noqa: E731
            ActionChains(browser).move_to_element_with_offset(canvas, off(x0), off(y0)).click_and_hold() \
                .move_by_offset(off(x1) - off(x0), off(y1) - off(y0)).release().perform()

        stroke(10, 20, 50, 20)                              # a horizontal white band at y = 20
        browser.find_element(By.ID, "eraser").click()
        stroke(30, 12, 30, 28)                              # erase a vertical cut through it at x = 30
        browser.find_element(By.ID, "eraser").click()
        Select = __import__("selenium.webdriver.support.select", fromlist=["Select"]).Select
        Select(browser.find_element(By.ID, "inpaint-area")).select_by_value("masked")
        _generate(browser, steps=2, seed=3)
        assert pipe.masks and pipe.masks[-1] is not None
        png, area, blur = pipe.masks[-1]
        m = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
        assert m.shape == (64, 64) and area == "masked" and blur == 4
        assert m[20, 15] == 255 and m[20, 45] == 255        # painted
        assert m[20, 30] == 0                               # erased
        assert m[5, 5] == 0 and m[40, 20] == 0              # never painted
        browser.find_element(By.ID, "clear-mask").click()
        n = len(pipe.masks)
        browser.find_element(By.ID, "generate").click()
        _wait(browser, "return document.querySelectorAll('#gallery .card img').length >= 2", timeout=60)
        assert len(pipe.masks) == n + 1 and pipe.masks[-1] is None


def test_dropping_a_png_fills_the_form(browser, tmp_path):
    """A PNG with AUTOMATIC1111 parameters dropped on the page: its prompt (with A1111
    weights), negative prompt, seed, sampler, schedule, steps, guidance, size and clip skip
    fill the form (cpuflow reads them on the server: POST /api/params-from-image)."""
    import base64

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", "a (red:1.2) circle, BREAK blue background\nNegative prompt: green\n"
                                "Steps: 12, Sampler: Euler a, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, "
                                "Size: 128x96, Model hash: abcdef0123, Clip skip: 2, Version: v1.10.1")
    png = tmp_path / "a1111.png"
    Image.new("RGB", (128, 96), "white").save(png, pnginfo=info)
    data = base64.b64encode(png.read_bytes()).decode()
    with LiveServer({"fake": FakePipeline(step_delay=0.01)}) as srv:
        browser.get(srv.url + "/")
        _wait(browser, "return document.getElementById('model').options.length > 0")
        browser.execute_script(
            "const b = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));"
            "const dt = new DataTransfer(); dt.items.add(new File([b], 'a1111.png', {type: 'image/png'}));"
            "document.getElementById('gallery').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true,"
            " cancelable: true}));", data)
        _wait(browser, "return document.getElementById('status').textContent.startsWith('Settings loaded')")
        value = lambda i: browser.execute_script(f"return document.getElementById('{i}').value")  # noqa: E731
        assert value("prompt") == "a (red:1.2) circle, BREAK blue background" and value("negative") == "green"
        assert (value("steps"), value("guidance"), value("width"), value("height")) == ("12", "6.5", "128", "96")
        assert (value("sampler"), value("schedule"), value("seed"), value("clip-skip")) == \
            ("euler_a", "karras", "1234", "2")
        assert not browser.execute_script("return document.getElementById('seed-random').checked")
        _no_console_errors(browser)


def test_upscale_button_in_the_browser(browser, tiny_upscale_export):
    """A gallery image's "Upscale x4" button: the tiny x4 upscaler (real, exported) makes a 4x
    image of it, with the same prompt and seed, shown as a new card. The upscaler is not
    offered as a model to generate with."""
    from selenium.webdriver.common.by import By
    with LiveServer({"fake": FakePipeline(step_delay=0.01), "x4": tiny_upscale_export.model}) as srv:
        browser.get(srv.url + "/")
        _generate(browser, steps=3, seed=7)
        options = browser.execute_script("return Array.from(document.getElementById('model').options)"
                                         ".map(o => o.value)")
        assert options == ["fake"]
        card = browser.find_element(By.CSS_SELECTOR, "#gallery .card")
        card.find_element(By.XPATH, ".//button[text()='Upscale x4']").click()
        _wait(browser, "const c = document.querySelectorAll('#gallery .card');"
                       "return c.length === 2 && c[0].querySelector('img').complete && "
                       "c[0].querySelector('img').naturalWidth > 0", timeout=180)
        first = browser.find_element(By.CSS_SELECTOR, "#gallery .card")
        assert "upscaled ×4 from 64×64, noise level 20" in first.text and "seed 7" in first.text
        assert PROMPT in first.text and "256×256" in first.text
        assert browser.execute_script("return document.querySelector('#gallery .card img').naturalWidth") == 256
        _wait(browser, "return document.getElementById('status').textContent.startsWith('Done')")
        _no_console_errors(browser)


def test_watermark_checkbox_in_the_browser(browser):
    # On by default: the image the page shows carries cpuflow's mark; unticked, the next one
    # carries none, its card says so, and "Use again" restores the unticked box.
    import io
    import urllib.request
    from selenium.webdriver.common.by import By
    from cpuflow.watermark import MESSAGE, detect

    def shown_image():
        src = browser.find_element(By.CSS_SELECTOR, "#gallery .card img").get_attribute("src")
        with urllib.request.urlopen(src) as r:
            return Image.open(io.BytesIO(r.read()))

    with LiveServer({"fake": FakePipeline(step_delay=0.01)}) as srv:
        browser.get(srv.url + "/")
        _wait(browser, "return document.getElementById('model').options.length > 0")
        for side in ("width", "height"):                         # big enough to carry the mark
            box = browser.find_element(By.ID, side)
            box.clear()
            box.send_keys("256")
        box = browser.find_element(By.ID, "watermark")
        assert box.is_selected()
        _generate(browser, steps=2, seed=42)
        assert "watermarked" in browser.find_element(By.CSS_SELECTOR, "#gallery .card").text
        found = detect(shown_image())
        assert found is not None and found.message == MESSAGE
        box.click()
        seed = browser.find_element(By.ID, "seed")
        seed.clear()
        seed.send_keys("43")
        browser.find_element(By.ID, "generate").click()
        _wait(browser, "const c = document.querySelectorAll('#gallery .card img');"
                       "return c.length === 2 && c[0].complete && c[0].naturalWidth > 0")
        card = browser.find_element(By.CSS_SELECTOR, "#gallery .card")    # the newest comes first
        assert "seed 43" in card.text and "no watermark" in card.text
        assert detect(shown_image()) is None
        assert _pixel(browser, 2, 2)[:3] == list(colour_of(PROMPT, 43))   # untouched pixels
        box.click()
        card.find_element(By.XPATH, ".//button[text()='Use again']").click()
        assert not box.is_selected()
        _no_console_errors(browser)


def test_embedding_picker_in_the_browser(browser, tmp_path):
    """`serve --embeddings-dir`: the page lists the folder's embeddings as chips whose buttons put
    the word in (and take it out of) the prompt or the negative prompt; Generate sends the
    words the prompts use, which the server resolves in its own folder."""
    from selenium.webdriver.common.by import By
    from test_server_embeddings import _safetensors

    import numpy as np
    d = tmp_path / "embeddings"
    d.mkdir()
    for name in ("bad-hands", "style"):
        _safetensors(d / f"{name}.safetensors", {"emb_params": np.ones((1, 8), np.float32)})
    seen = []
    pipe = FakePipeline(step_delay=0.01)
    real_run = pipe._run
    pipe._run = lambda req, progress: (seen.append(req), real_run(req, progress))[1]
    with LiveServer({"fake": pipe}, embeddings_dir=str(d)) as srv:
        browser.get(srv.url + "/")
        _wait(browser, "return document.querySelectorAll('#embeddings .chip').length === 2")
        value = lambda i: browser.execute_script(f"return document.getElementById('{i}').value")  # noqa: E731

        def click(word, target):
            browser.find_element(By.CSS_SELECTOR, f"#embeddings .chip[data-word='{word}'] button.to-{target}").click()
        browser.find_element(By.ID, "prompt").send_keys("a cat")
        click("style", "prompt")
        click("bad-hands", "negative")
        assert (value("prompt"), value("negative")) == ("a cat, style", "bad-hands")
        click("style", "prompt")                                   # a second click takes it out
        assert value("prompt") == "a cat"
        chip = browser.find_element(By.CSS_SELECTOR, "#embeddings .chip[data-word='style']")
        assert "on" not in chip.get_attribute("class").split()
        click("style", "prompt")
        assert "on" in chip.get_attribute("class").split()
        browser.find_element(By.ID, "generate").click()
        _wait(browser, "const i = document.querySelector('#gallery .card img');"
                       "return i !== null && i.complete && i.naturalWidth > 0")
        assert seen[0].prompt == "a cat, style" and seen[0].negative_prompt == "bad-hands"
        assert sorted(seen[0].embeddings) == sorted(str((d / f"{n}.safetensors").resolve())
                                                    for n in ("bad-hands", "style"))
        _no_console_errors(browser)
    with LiveServer({"fake": FakePipeline(step_delay=0.01)}) as srv:     # no folder: no picker
        browser.get(srv.url + "/")
        _wait(browser, "return document.getElementById('model').options.length > 0")
        assert not browser.find_element(By.ID, "embeddings-box").is_displayed()
