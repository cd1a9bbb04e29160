"""The web page (page.py). Without a browser: the page's values become the CLI's flags, and bad values
give the CLI's error line. In a real headless browser: start the server on a free port, show the CLI's
error line for bad input (no image, an out-of-range value, an empty edit, an image over the pixel limit,
a file that is not an image) while the server keeps serving, then run one toy edit, check that while it
runs the page shows the steps and the mask so far, and that then the result, the masks and the figures
appear.

Needs Gradio (requirements-page.txt), selenium (requirements-dev.txt) and Debian's chromium and
chromium-driver (.ci/run installs them); skipped with the reason where one is missing. The screenshot
is kept in out/test-page/page.png."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "out" / "test-page"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

BROWSER_TEST = (
    pytest.mark.slow,  # 30-40 s on 2 busy cores: server start, six clicks, one 10-step toy edit
    pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="no gradio (pip install -r requirements-page.txt)"),
    pytest.mark.skipif(importlib.util.find_spec("selenium") is None, reason="no selenium (requirements-dev.txt)"),
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium and chromedriver (apt-get install chromium chromium-driver)"),
)


def browser_test(f):
    for mark in BROWSER_TEST:
        f = mark(f)
    return f


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("page") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(REPO / "page.py"), "--port", str(port), "--device", "cpu"],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):  # Gradio's import alone takes ~10 s on a busy machine
            if proc.poll() is not None:
                pytest.fail(f"page.py exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"page.py did not answer on {url}: {log.read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2000"):
        opts.add_argument(a)
    d = webdriver.Chrome(options=opts, service=Service(DRIVER))  # the system driver: nothing is downloaded
    yield d
    d.quit()


def cli_error(image: Path | None, *flags: str) -> str:
    """The error line instdiffedit.py prints for the same input (the uploaded copy is named like the file:
    the page names it without the server's upload folder)."""
    import instdiffedit
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = instdiffedit.main(([f"--image={image}"] if image else []) + ["--model", "toy", *flags])
        except SystemExit as e:  # argparse
            code = e.code
    assert code == 2
    line = err.getvalue().strip().splitlines()[-1].replace("instdiffedit.py: error:", "error:")
    return line.replace(str(image), image.name) if image else line


def test_page_values_become_the_cli_flags_and_errors(tmp_path):
    """Without a browser or Gradio: the page's values as CLI flags, and its status line for bad values
    equal to the line the CLI prints for the same values."""
    import page
    argv = page.cli_argv("a.png", "--x", "sdedit", "", {"strength": 0.25, "rounds": 3.0, "steps": None, "seed": -1},
                         tmp_path, ["--model", "toy"])
    assert argv[:3] == ["--image=a.png", "--edit=--x", "--method=sdedit"]  # an edit text is never a flag
    assert "--strength=0.25" in argv and "--rounds=3" in argv and "--seed=-1" in argv
    assert not any(a.startswith("--steps") for a in argv)  # an empty box: the CLI's default
    p = page.Page(["--model", "toy"])
    scene = REPO / "assets" / "examples" / "scene.png"
    out = f"--out={tmp_path / 'cli'}"
    for values, flags in (((0.5, 0.2, 3, 50, -1), ["--seed=-1"]), ((0.5, 1.5, 3, 50, 0), ["--threshold=1.5"]),
                          ((0.5, 0.2, 2.5, 50, 0), ["--rounds=2.5"])):
        status, *rest = p.edit(str(scene), "a blue circle", "instdiffedit", "", *values)
        assert status == cli_error(scene, "--edit=a blue circle", out, *flags) and status.startswith("error: ")
        assert rest[0] is None  # no picture
    status = p.edit(str(scene), "a blue circle", "diffedit", "", 0.5, 0.2, 3, 50, 0)[0]
    assert status == cli_error(scene, "--edit=a blue circle", "--method=diffedit", out)


@browser_test
def test_page_errors_then_edit(server, browser, tmp_path):
    from selenium.common.exceptions import ElementClickInterceptedException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    wait = WebDriverWait(d, 90)
    d.get(server)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#run"))

    def click(css: str) -> None:  # once nothing lies over it (Gradio's loading overlays come and go)
        def clicked(d):
            try:
                d.find_element(By.CSS_SELECTOR, css).click()
                return True
            except ElementClickInterceptedException:
                return False
        wait.until(clicked)

    def status_after_click() -> str:
        box = d.find_element(By.CSS_SELECTOR, "#status textarea")
        d.execute_script("arguments[0].value = ''", box)  # so a repeated message is seen as new
        click("#run")
        wait.until(lambda d: box.get_attribute("value").startswith(("done", "error")))  # not "step k: ..."
        return box.get_attribute("value")

    def set_value(css: str, text: str) -> None:
        box = d.find_element(By.CSS_SELECTOR, css)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(text)

    def upload(path: Path) -> None:
        d.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(str(path))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"))

    # bad input: the CLI's own line for the same input, in the page
    scene = REPO / "assets" / "examples" / "scene.png"
    out = f"--out={tmp_path / 'cli'}"
    set_value("#edit textarea", "a blue circle")
    assert status_after_click() == cli_error(None, "--edit=a blue circle", out) \
        == "error: --image and --edit are required (or --replay RUN_JSON)"
    upload(scene)
    set_value("#opt-rounds input", "0")
    assert status_after_click() == cli_error(scene, "--edit=a blue circle", "--rounds=0", out) \
        == "error: rounds 0 is outside [1, 1024]"
    set_value("#opt-rounds input", "2")
    set_value("#opt-steps input", "10")
    set_value("#edit textarea", " ")
    assert status_after_click() == cli_error(scene, "--edit= ", out) == "error: --edit is empty"
    set_value("#edit textarea", "a blue circle")
    big = tmp_path / "big.png"  # 8193 x 8193 = 67.1 M pixels, over the 64 M limit; a 200 kB file
    Image.new("L", (8193, 8193), 255).save(big)
    text = tmp_path / "notes.png"  # not an image at all
    text.write_text("not an image\n")
    for bad, says in ((big, "image is over the 64,000,000-pixel limit"), (text, "not a readable image")):
        click("#input-image button[aria-label='Remove Image']")
        d.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(str(bad))
        line = status_after_click()
        assert line == cli_error(bad, "--edit=a blue circle", out) and says in line, line

    # the server kept serving: one toy edit, 30 steps, watched while it runs: every 50 ms a script in the
    # page notes the status line and the steps strip's picture whenever either changes
    click("#input-image button[aria-label='Remove Image']")
    upload(scene)
    set_value("#opt-steps input", "30")
    d.execute_script("""
        window.seen = [];
        window.watch = setInterval(() => {
            const v = document.querySelector('#status textarea').value;
            const img = document.querySelector('#steps img');
            const now = [v, img ? img.getAttribute('src') : null];
            const last = window.seen[window.seen.length - 1];
            if (!last || last[0] !== now[0] || last[1] !== now[1]) window.seen.push(now);
        }, 50);""")
    status = status_after_click()
    assert status.startswith("done in"), status
    seen = d.execute_script("clearInterval(window.watch); return window.seen;")
    live = [i for i, (v, _) in enumerate(seen) if v.startswith("step ")]
    # the live view: before the result, the status counted the steps and the strip showed the mask so far
    assert live and all(seen[i][0].endswith(": the mask so far") and seen[i][1] for i in live), seen
    assert live[-1] < next(i for i, (v, _) in enumerate(seen) if v.startswith("done")), seen
    counts = [int(seen[i][0].split()[1].rstrip(":")) for i in live]
    assert counts == sorted(counts) and counts[-1] <= 30, counts
    for part in ("result", "mask", "soft-mask", "attention", "steps"):
        img = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#{part} img"))[0]
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))
        assert img.get_attribute("naturalWidth") not in (None, "0"), part
    words = d.find_element(By.CSS_SELECTOR, "#words").text
    assert "blue" in words and "circle" in words and "P (Eq. 8)" in words
    assert d.find_elements(By.CSS_SELECTOR, "#download a"), "no download link for the outputs"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "page.png"
    d.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
