"""End to end in a real browser: headless Chromium drives the demo page (demo/server.py) in
front of a real TorchServe serving both archives; screenshots go to docs/ for the README.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make install`` installs them).
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Iterator

import av
import pytest
import requests
from PIL import Image

from demo.server import DemoSettings, make_server, served_models
from export.__main__ import main as export_main
from model_defs import LABELS, SHIPPED_WEIGHTS
from serving import running_server
from tests.test_demo_server import free_port, running
from tests.test_video_handler import video_checkpoint
from tests.tsserver import image_weights

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
FIXTURES = Path(__file__).parent / "fixtures"
GROUP = FIXTURES / "photos" / "group.jpg"
CLIP = FIXTURES / "video" / "face_leaves_hevc_256x144.mov"  # HEVC: Chromium cannot play it
CAMERA_CLIP = FIXTURES / "video" / "mead_happy_1s_128.mp4"  # the fake camera's picture (looped)
VIDEO_WEIGHTS = SHIPPED_WEIGHTS["video"]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000", "--hide-scrollbars",
                  "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                  "--autoplay-policy=no-user-gesture-required")
WAIT_S = 60.0
MODELS = served_models()  # task -> model name, as export names the archives


@contextlib.contextmanager
def demo_server(settings: DemoSettings) -> Iterator[str]:
    """The demo server in a thread; yields its base URL and always shuts it down."""
    with running(make_server(settings)):
        yield settings.origin


def y4m_camera(src: Path, dst: Path, size: tuple[int, int] = (640, 480)) -> Path:
    """``src`` as a Y4M file (what Chromium's fake camera plays, looped): each frame scaled up
    into a ``size`` grey frame, the face in the middle."""
    w, h = size
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="yuv4mpegpipe") as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream("rawvideo", rate=s_in.average_rate)
        s_out.width, s_out.height, s_out.pix_fmt = w, h, "yuv420p"
        for frame in inp.decode(s_in):
            canvas = Image.new("RGB", size, (110, 110, 110))
            side = int(h * 0.8)
            canvas.paste(frame.to_image().resize((side, side)), ((w - side) // 2, (h - side) // 2))
            out.mux(s_out.encode(av.VideoFrame.from_image(canvas).reformat(format="yuv420p")))
        out.mux(s_out.encode())
    return dst


def h264_copy(src: Path, dst: Path) -> Path:
    """``src`` re-encoded as H.264 MP4 (same frames and rate), which Chromium can play."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream("libx264", rate=s_in.average_rate)
        s_out.width, s_out.height, s_out.pix_fmt = s_in.width, s_in.height, "yuv420p"
        for frame in inp.decode(s_in):
            out.mux(s_out.encode(frame.reformat(format="yuv420p")))
        out.mux(s_out.encode())
    return dst


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """TorchServe (image and video archives) + the demo server on a key file the tests control."""
    tmp = tmp_path_factory.mktemp("demo-e2e")
    store = tmp / "model_store"
    video_ckpt = VIDEO_WEIGHTS if VIDEO_WEIGHTS.is_file() else video_checkpoint(tmp / "video.pth")
    assert export_main(["--task", "image", "--checkpoint", str(image_weights(tmp)), "--out", str(store),
                        "--workers", "1"]) == 0
    assert export_main(["--task", "video", "--checkpoint", str(video_ckpt), "--out", str(store),
                        "--workers", "1"]) == 0
    models = dict(MODELS)
    if VIDEO_WEIGHTS.is_file():  # the live model is the shipped per-frame video model
        assert export_main(["--task", "live", "--checkpoint", str(VIDEO_WEIGHTS), "--out", str(store)]) == 0
    else:
        models.pop("live")
    with running_server(store, [f"{m}={m}.mar" for m in models.values()], tmp / "server") as ts:
        key_file = tmp / "key_file.json"
        key_file.write_bytes((ts.workdir / "key_file.json").read_bytes())
        settings = DemoSettings(host="127.0.0.1", port=free_port(), inference_url=ts.inference_url,
                                key_file=key_file, models=models,
                                labels=tuple(LABELS))
        with demo_server(settings) as url:
            yield {"ts": ts, "url": url, "tmp": tmp, "key_file": key_file}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed (Debian packages chromium, chromium-driver: "
                    f"`make install` installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # explicit paths: Selenium Manager downloads nothing
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    camera = y4m_camera(CAMERA_CLIP, tmp_path_factory.mktemp("camera") / "camera.y4m")
    options.add_argument(f"--use-file-for-fake-video-capture={camera}")
    with tempfile.TemporaryDirectory(prefix="demo-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        try:
            yield driver
        finally:
            driver.quit()


def ask_service(stack, model: str, path: Path) -> dict:
    ts = stack["ts"]
    r = requests.post(ts.predictions_url(model), headers=ts.auth(), data=path.read_bytes(), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(driver, condition: str, *args, timeout: float = WAIT_S):
    """Poll a JavaScript expression (``return ...``) until it is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(condition, *args)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {condition}\nmessage on the page: {message(driver)!r}")
        time.sleep(0.1)


def open_page(driver, url: str, tab: str = "Photo") -> None:
    driver.get(url + "/")
    wait_for(driver, "return document.body.dataset.ready === 'true' || !document.getElementById('message').hidden")
    driver.execute_script("[...document.querySelectorAll('.tabs button')].find(b => b.textContent === arguments[0])"
                          ".click()", tab)


def upload(driver, input_id: str, path: Path, stage_id: str) -> None:
    driver.execute_script("document.getElementById(arguments[0]).dataset.state = ''", stage_id)
    driver.find_element("id", input_id).send_keys(str(path))
    wait_for(driver, "return document.getElementById(arguments[0]).dataset.state === 'done'", stage_id)


def message(driver) -> str:
    return driver.execute_script("const m = document.getElementById('message'); return m.hidden ? '' : m.textContent")


def test_photo_gets_one_box_per_face_with_its_label(stack, browser):
    expected = ask_service(stack, MODELS["image"], GROUP)
    assert len(expected["faces"]) >= 4
    open_page(browser, stack["url"])
    upload(browser, "photo-input", GROUP, "photo-stage")
    assert message(browser) == ""
    assert browser.execute_script("return window.demo.last") == expected
    img = browser.find_element("id", "photo-img")
    natural_w = browser.execute_script("return arguments[0].naturalWidth", img)
    scale = img.rect["width"] / natural_w
    boxes = browser.find_elements("css selector", "#photo-boxes .box")
    assert len(boxes) == len(expected["faces"])
    for box, face in zip(boxes, expected["faces"]):
        x1, y1, x2, y2 = face["box"]
        r = box.rect
        assert abs(r["x"] - (img.rect["x"] + x1 * scale)) < 2 and abs(r["y"] - (img.rect["y"] + y1 * scale)) < 2
        assert abs(r["width"] - (x2 - x1) * scale) < 2 and abs(r["height"] - (y2 - y1) * scale) < 2
        top = face["top3"][0]
        assert box.get_attribute("data-label") == top["label"]
        assert box.text.startswith(f"{int(box.get_attribute('data-index')) + 1} {top['label']}")
    tabs = browser.execute_script(  # the group's nearby faces: no label tab covers another
        "return [...document.querySelectorAll('#photo-boxes .box-label')]"
        ".map((t) => { const r = t.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })")
    for i, a in enumerate(tabs):
        for b in tabs[:i]:
            assert not (a[0] < b[2] - 0.5 and b[0] < a[2] - 0.5 and a[1] < b[3] - 0.5 and b[1] < a[3] - 0.5), (a, b)
    cards = browser.find_elements("css selector", "#photo-faces .face")
    assert len(cards) == len(expected["faces"])
    assert len(cards[0].find_elements("css selector", ".bar")) == 3
    # hovering a bar shows its probability
    from selenium.webdriver import ActionChains

    bar = cards[0].find_elements("css selector", ".bar")[1]
    tip = bar.find_element("css selector", ".bar-tip")
    assert not tip.is_displayed()
    ActionChains(browser).move_to_element(bar).perform()
    assert tip.is_displayed() and tip.text == f"{100 * expected['faces'][0]['top3'][1]['probability']:.1f}%"
    ActionChains(browser).move_by_offset(0, 400).perform()
    browser.save_screenshot(str(DOCS / "demo_photo.png"))


def test_why_toggle_overlays_each_faces_map(stack, browser):
    """The "why" toggle asks the explanations API and draws each face's map over its crop."""
    ts = stack["ts"]
    r = requests.post(f"{ts.inference_url}/explanations/{MODELS['image']}", headers=ts.auth(),
                      data=GROUP.read_bytes(), timeout=120)
    assert r.status_code == 200, r.text
    expected = r.json()
    open_page(browser, stack["url"])
    upload(browser, "photo-input", GROUP, "photo-stage")
    assert not browser.find_element("id", "photo-why").is_displayed()
    browser.find_element("id", "photo-why-toggle").click()
    wait_for(browser, "return document.getElementById('photo-stage').dataset.why === 'done'")
    assert message(browser) == ""
    assert browser.execute_script("return window.demo.explained.answer") == expected
    assert browser.find_element("id", "photo-why").is_displayed()
    alpha = "return document.getElementById('photo-why').getContext('2d').getImageData(arguments[0], arguments[1], 1, 1).data[3]"
    for face in expected["faces"]:  # opaque at each map's hottest cell, in the photo's pixels
        e = face["explanation"]
        g, cells = e["grid"], e["map"]
        i, j = max(((i, j) for i in range(g) for j in range(g)), key=lambda ij: cells[ij[0]][ij[1]])
        (x0, y0), (x1, y1), _, (x3, y3) = e["corners"]
        x = x0 + (x1 - x0) * (j + 0.5) / g + (x3 - x0) * (i + 0.5) / g
        y = y0 + (y1 - y0) * (j + 0.5) / g + (y3 - y0) * (i + 0.5) / g
        assert browser.execute_script(alpha, int(x), int(y)) > 150, (face["box"], i, j)
    assert browser.execute_script(alpha, 5, 5) == 0  # no face near the photo's corner
    thumbs = browser.find_elements("css selector", "#photo-faces .face canvas.why-thumb")
    assert len(thumbs) == len(expected["faces"]) and all(t.is_displayed() for t in thumbs)
    browser.save_screenshot(str(DOCS / "demo_why.png"))
    requests_before = browser.execute_script("return window.demo.requests")
    browser.find_element("id", "photo-why-toggle").click()  # off: the photo alone
    assert not browser.find_element("id", "photo-why").is_displayed()
    assert not browser.find_elements("css selector", "#photo-faces canvas.why-thumb")
    browser.find_element("id", "photo-why-toggle").click()  # on again: the answer is kept
    wait_for(browser, "return document.getElementById('photo-why').checkVisibility()")
    assert browser.execute_script("return window.demo.requests") == requests_before


def timeline_points(driver) -> list[dict]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#timeline g.window')].map(g => ({start: +g.dataset.start, "
        "end: +g.dataset.end, top: g.dataset.top, points: g.querySelectorAll('circle').length}))")


def check_timeline(driver, expected: dict) -> None:
    points = timeline_points(driver)
    assert len(points) == len(expected["timeline"]) >= 2
    for point, window in zip(points, expected["timeline"]):
        assert (point["start"], point["end"]) == (window["start"], window["end"])
        assert point["top"] == window["top3"][0]["label"] and point["points"] == 3


# the box drawn is the image model's for the frame at 1.0 s
BOX_AT_1S = ("return Math.abs(window.demo.video.boxTime - 1.0) < 0.05 && "
             "document.querySelectorAll('#video-boxes .box').length === 1")


def test_clip_gets_a_timeline_with_one_point_per_window(stack, browser):
    expected = ask_service(stack, MODELS["video"], CLIP)
    open_page(browser, stack["url"], "Video")
    upload(browser, "video-input", CLIP, "video-stage")  # HEVC: the page says it cannot play it
    assert message(browser) == ""
    assert browser.execute_script("return window.demo.last") == expected
    check_timeline(browser, expected)
    assert "cannot play" in browser.find_element("id", "video-note").text

    # the same clip as H.264, which Chromium plays: box, label and cursor follow playback
    mp4 = h264_copy(CLIP, stack["tmp"] / "face_leaves_h264.mp4")
    expected = ask_service(stack, MODELS["video"], mp4)
    upload(browser, "video-input", mp4, "video-stage")
    assert message(browser) == ""
    check_timeline(browser, expected)
    def cursor_x() -> float:
        return float(browser.execute_script("return document.querySelector('#timeline .cursor').getAttribute('x1')"))

    start_x = cursor_x()
    browser.execute_script("const v = document.getElementById('video'); v.currentTime = 1.0;")
    wait_for(browser, BOX_AT_1S)
    first = expected["timeline"][0]["top3"][0]
    assert browser.find_element("css selector", "#video-boxes .box").get_attribute("data-label") == first["label"]
    assert cursor_x() > start_x
    assert browser.find_element("id", "video-now").text.startswith(f"At 1.0 s (window 0.0–2.0 s): {first['label']}")
    browser.execute_script("document.getElementById('video').play()")
    wait_for(browser, "return document.getElementById('video').currentTime > 1.5")
    browser.execute_script("const v = document.getElementById('video'); v.pause(); v.currentTime = 1.0;")
    wait_for(browser, BOX_AT_1S)
    browser.save_screenshot(str(DOCS / "demo_video.png"))


def test_corrupt_files_get_the_services_message(stack, browser):
    bad_photo = stack["tmp"] / "truncated.jpg"
    bad_photo.write_bytes(GROUP.read_bytes()[:5000])
    open_page(browser, stack["url"])
    upload(browser, "photo-input", bad_photo, "photo-stage")
    text = message(browser)
    assert text.startswith("The service answered 400 BadRequest: cannot decode image: corrupt or truncated"), text
    assert browser.find_elements("css selector", "#photo-boxes .box") == []

    bad_clip = stack["tmp"] / "truncated.mp4"
    bad_clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    open_page(browser, stack["url"], "Video")
    upload(browser, "video-input", bad_clip, "video-stage")
    text = message(browser)
    assert text.startswith("The service answered 400 BadRequest: cannot decode video"), text


def test_wrong_key_and_server_down_are_explained(stack, browser):
    key_file: Path = stack["key_file"]
    good = key_file.read_text()
    keys = json.loads(good)
    keys["inference"]["key"] = "not-the-key"
    key_file.write_text(json.dumps(keys))
    try:
        open_page(browser, stack["url"])
        upload(browser, "photo-input", GROUP, "photo-stage")
        assert message(browser).startswith("TorchServe refused the inference key (400 InvalidKeyException)")
    finally:
        key_file.write_text(good)
    down = DemoSettings(host="127.0.0.1", port=free_port(), inference_url=f"http://127.0.0.1:{free_port()}",
                        key_file=key_file, models=MODELS,
                        labels=tuple(LABELS))
    with demo_server(down) as url:
        open_page(browser, url)
        upload(browser, "photo-input", GROUP, "photo-stage")
        assert message(browser).startswith(f"no answer from TorchServe at {down.inference_url}")


def test_webcam_streams_to_the_live_model(stack, browser):
    """Chromium's fake camera plays a real clip (a happy face, looped): the tab's sequence gets a
    person id, a smoothed label, a 30-second chart and CSV rows, from the live model."""
    if not VIDEO_WEIGHTS.is_file():
        pytest.skip(f"{VIDEO_WEIGHTS} is missing: the live model is the shipped per-frame video model")
    open_page(browser, stack["url"], "Webcam")
    privacy = browser.find_element("id", "webcam-privacy")
    assert privacy.is_displayed() and "this demo server only" in privacy.text
    browser.find_element("id", "webcam-start").click()
    wait_for(browser, "return +(document.getElementById('webcam-stage').dataset.frames || 0) >= 12", timeout=90)
    browser.execute_script("clearInterval(window.demo.webcam.timer)")  # hold still for the checks
    wait_for(browser, "return !window.demo.webcam.busy")
    assert message(browser) == ""
    answer = browser.execute_script("return window.demo.last")
    assert answer["sequence"].startswith("tab-") and answer["frame"] >= 12
    (person,) = answer["people"]
    top = person["top3"][0]
    assert person["id"] == 0 and person["smoothing"] == "pooled" and top["label"] == "happy", person
    (box,) = browser.find_elements("css selector", "#webcam-boxes .box")
    assert box.get_attribute("data-person") == "0" and box.get_attribute("data-label") == top["label"]
    assert box.text.startswith(f"0 {top['label']}")
    (card,) = browser.find_elements("css selector", "#webcam-faces .face")
    assert card.text.startswith("Person 0") and len(card.find_elements("css selector", ".bar")) == 3
    lines = browser.execute_script(
        "return [...document.querySelectorAll('svg.live-chart[data-person=\"0\"] polyline')]"
        ".map(l => [l.dataset.label, l.getAttribute('points').trim().split(' ').length])")
    assert sorted(label for label, _ in lines) == sorted(LABELS)
    csv = browser.execute_script("return window.demoLiveCsv()").splitlines()
    assert csv[0] == "time,person,label," + ",".join(LABELS) and len(csv) >= 1 + 10
    # a point and a CSV row per answer with the person in it (under 30 s)
    assert all(points == len(csv) - 1 for _, points in lines)
    last = csv[-1].split(",")
    assert last[1:3] == ["0", top["label"]]
    assert float(last[3 + LABELS.index(top["label"])]) == pytest.approx(person["probabilities"][top["label"]], abs=1e-4)
    browser.save_screenshot(str(DOCS / "demo_live.png"))
    browser.find_element("id", "webcam-stop").click()
    assert "Stopped after" in browser.find_element("id", "webcam-note").text
