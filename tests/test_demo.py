"""The Gradio demo: its package logic (`perceptiondlm/demo.py`), the app driven in headless Chromium through
Playwright (Debian's chromium, never a downloaded browser), and its API endpoint through gradio_client."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from perceptiondlm.data.synthetic import make_scene, parse_caption
from perceptiondlm.demo import (
    APP_PATH,
    ASSETS_DIR,
    DEFAULT_MODEL_PATH,
    FALLBACK_MODEL_PATH,
    MASKED_PLACEHOLDER,
    PALETTE,
    caption_cards_html,
    caption_stream,
    check_generation,
    collect_regions,
    masks_from_editor,
    overlay,
    preset_gallery,
    region_colour,
    resolve_model_path,
    result_json,
    serve,
)
from perceptiondlm.diffusion.sampler import SamplerStats
from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.inference import RegionCaptions

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("PERCEPTIONDLM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]
EMBEDDED = (DEFAULT_MODEL_PATH / "config.json").is_file()  # the trained tiny model, once it is shipped
MODEL_DIR = DEFAULT_MODEL_PATH if EMBEDDED else FALLBACK_MODEL_PATH
# The golden random checkpoint is decoded short to stay fast; the embedded model gets its demo defaults.
OPTIONS = {"gen_length": 16, "steps": 16} if EMBEDDED else {"gen_length": 8, "steps": 8}
DEMO_SCENE = (2, 118)  # assets/README.md


def _rgb(hex_colour: str) -> tuple[int, ...]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))


def _required(what: str, how: str) -> None:
    """Missing test equipment: a failure in CI (it must run there), a skip on a developer's machine."""
    message = f"{what} is missing: {how}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        _required(f"the Python package {name}", "pip install 'perceptiondlm[demo]' playwright")
        raise


@pytest.fixture(scope="module")
def model():
    from perceptiondlm import PerceptionDLM

    return PerceptionDLM.from_pretrained(MODEL_DIR).eval()


@pytest.fixture(scope="module")
def demo_inputs() -> tuple[Image.Image, list[Path]]:
    (preset,) = [p for p in preset_gallery(ASSETS_DIR) if p.name == "demo"]
    return Image.open(preset.image).convert("RGB"), preset.masks


# ---------------------------------------------------------------- package logic
def test_overlay_tints_outlines_and_labels_each_region() -> None:
    image = np.full((32, 32, 3), 100, np.uint8)
    masks = [np.zeros((32, 32), bool), np.zeros((32, 32), bool)]
    masks[0][2:14, 2:14] = True
    masks[1][18:30, 16:30] = True
    out = np.asarray(overlay(image, masks, min_side=64))
    assert out.shape == (64, 64, 3)  # upscaled ×2 (NEAREST) so labels are legible
    for i, (y0, x0) in enumerate([(4, 4), (36, 32)]):  # top-left corners of the regions, upscaled
        colour = np.array(_rgb(region_colour(i)))
        assert (out[y0, x0] == colour).all()  # outline in the region's own colour
        inside = out[y0 + 3, x0 + 3].astype(int)  # tinted interior: 0.7 × grey + 0.3 × colour
        assert np.abs(inside - np.rint(0.7 * 100 + 0.3 * colour)).max() <= 1
    # Region 0's label: a disc of radius 7 in its colour around the pixel nearest its centroid, (7, 7) → (15, 15)
    # upscaled, with the number in white.
    assert (out[15, 21] == _rgb(PALETTE[0])).all() and (out[15, 9] == _rgb(PALETTE[0])).all()
    assert (out[9:22, 11:20] == 255).all(-1).any()
    assert (out[0, 40] == 100).all()  # outside every region: untouched


def test_overlay_label_of_a_ring_sits_on_the_ring_and_captions_add_a_panel() -> None:
    yy, xx = np.mgrid[0:40, 0:40]
    ring = np.abs(np.hypot(yy - 19.5, xx - 19.5) - 14) < 2.5
    plain = np.asarray(overlay(np.zeros((40, 40, 3), np.uint8), [ring], min_side=40))
    assert not (plain[15:25, 15:25] == _rgb(PALETTE[0])).all(-1).any()  # no label in the ring's empty centre
    assert (plain == 255).all(-1).any()  # the white number sits on the ring
    captioned = overlay(np.zeros((40, 40, 3), np.uint8), [ring], ["a ring " * 12], min_side=200)
    panel = np.asarray(captioned)[200:]
    assert captioned.height > 200
    assert (np.abs(panel.astype(int) - _rgb(PALETTE[0])).max(-1) < 40).sum() > 20  # text in the region colour


def test_masks_from_editor_one_region_per_layer_or_brush_colour() -> None:
    layer_a, layer_b = np.zeros((8, 12, 4), np.uint8), np.zeros((8, 12, 4), np.uint8)
    layer_a[1:4, 1:4] = (230, 25, 75, 255)
    layer_b[5:8, 6:12] = (60, 180, 75, 255)
    empty = np.zeros((8, 12, 4), np.uint8)
    masks = masks_from_editor({"background": None, "layers": [layer_a, empty, Image.fromarray(layer_b)]}, (12, 8))
    assert [m.sum() for m in masks] == [9, 18]
    assert masks[0][1:4, 1:4].all() and masks[1][5:8, 6:12].all()
    # One layer, two brush colours; jittered RGB (premultiplied alpha), a faint edge and one blended pixel.
    one = np.zeros((16, 16, 4), np.uint8)
    one[0:6, 0:6] = (230, 25, 75, 255)
    one[0:3, 0:6, 0] = 228
    one[8:16, 8:16] = (66, 99, 216, 255)
    one[7, 0:16] = (66, 99, 216, 60)  # alpha ≤ 127: not painted
    one[6, 6] = (148, 62, 145, 255)  # where the two colours blend
    red, blue = masks_from_editor({"layers": [one]}, (16, 16))
    assert red.sum() == 36 and red[0:6, 0:6].all()
    assert blue.sum() == 64 and blue[8:16, 8:16].all()
    assert masks_from_editor(None, (4, 4)) == [] and masks_from_editor({"layers": [None, empty]}, (12, 8)) == []
    big = np.zeros((16, 24, 4), np.uint8)
    big[0:8, 0:8, 3] = 255
    (fitted,) = masks_from_editor({"layers": [big]}, (12, 8))  # same aspect ratio: resized to the image
    assert fitted.shape == (8, 12) and fitted.sum() == 16
    with pytest.raises(PerceptionDLMError, match="aspect ratio"):
        masks_from_editor({"layers": [big]}, (10, 10))


def test_preset_gallery_pairs_images_with_their_masks(tmp_path: Path) -> None:
    pixel = Image.new("L", (4, 4), 255)
    for name in ("demo.png", "demo_mask_0.png", "demo_mask_10.png", "demo_mask_2.png", "demo2.jpg",
                 "demo2_mask_0.jpg", "demo3.png", "other.png", "other_mask_0.png"):
        pixel.save(tmp_path / name)
    presets = preset_gallery(tmp_path)
    assert [p.name for p in presets] == ["demo", "demo2"]  # demo3 has no masks; other* is not a demo
    assert [m.name for m in presets[0].masks] == ["demo_mask_0.png", "demo_mask_2.png", "demo_mask_10.png"]
    assert preset_gallery(tmp_path / "missing") == []


def test_shipped_preset_is_the_documented_scene() -> None:
    (preset,) = preset_gallery(ASSETS_DIR)
    scene = make_scene(*DEMO_SCENE)
    assert (np.asarray(Image.open(preset.image).convert("RGB")) == scene.image).all()
    assert len(preset.masks) == len(scene.masks) == 4
    for path, mask in zip(preset.masks, scene.masks, strict=True):
        assert (np.asarray(Image.open(path)) > 127).tolist() == mask.tolist()


def test_result_json_boxes_captions_and_stats() -> None:
    masks = [np.zeros((10, 20), bool), np.zeros((10, 20), bool)]
    masks[0][2:5, 3:9] = True
    masks[1][7, 19] = True
    stats = SamplerStats(nfe=4, tokens=16, content_tokens=12, seconds_vision=0.5, seconds_denoise=1.0)
    out = result_json(RegionCaptions(["a red cross", "a dot"], [[1], [2]], stats), masks)
    assert out["captions"] == ["a red cross", "a dot"]
    assert [r["bbox"] for r in out["regions"]] == [[3, 2, 9, 5], [19, 7, 20, 8]]  # x1, y1 exclusive
    assert [r["colour"] for r in out["regions"]] == [PALETTE[0], PALETTE[1]]
    assert out["stats"]["nfe"] == 4 and out["stats"]["tpf"] == stats.tpf and out["stats"]["seconds"] == 1.5
    json.dumps(out)


def test_caption_cards_render_placeholders_as_dots_and_escape_text() -> None:
    html = caption_cards_html([f"a {MASKED_PLACEHOLDER}{MASKED_PLACEHOLDER} cross", "<b>x</b>"], step=3, total_steps=8)
    assert html.count('class="pdlm-card"') == 2 and html.count('class="pdlm-dot"') == 2
    assert MASKED_PLACEHOLDER not in html and "<b>" not in html and "&lt;b&gt;" in html
    assert f"border-color:{PALETTE[1]}" in html and 'data-step="3"' in html and "step 3 / 8" in html


def test_request_checks_say_what_is_wrong(demo_inputs) -> None:
    image, masks = demo_inputs
    with pytest.raises(PerceptionDLMError, match="No image"):
        collect_regions(None, masks)
    with pytest.raises(PerceptionDLMError, match="No region"):
        collect_regions(image, [], {"layers": []})
    with pytest.raises(PerceptionDLMError, match="aspect ratio"):
        collect_regions(image, [REPO / "tests/fixtures/pdmllm/inputs/mask_b_halfres.png"])
    assert len(collect_regions(image, [{"path": str(masks[0])}, masks[1]])) == 2  # FileData dicts or paths
    check_generation(4, 128, 512)
    with pytest.raises(PerceptionDLMError, match="Too long a generation: 5 regions × 128 tokens"):
        check_generation(5, 128, 512)
    with pytest.raises(PerceptionDLMError, match="No PerceptionDLM checkpoint"):
        resolve_model_path(REPO / "no-such-model")
    path, notice = resolve_model_path(None)
    assert (path == DEFAULT_MODEL_PATH and notice is None) or (path == FALLBACK_MODEL_PATH and "noise" in notice)
    path, notice = resolve_model_path(None, base=True)  # `perceptiondlm chat`: the tiny Base model
    assert (path == DEFAULT_MODEL_PATH.with_name("tiny-perceptiondlm-base") and notice is None) or (
        path == FALLBACK_MODEL_PATH and "tiny-perceptiondlm-base" in notice)


def test_caption_stream_yields_every_step_then_the_result(model, demo_inputs) -> None:
    image, masks = demo_inputs
    states = list(caption_stream(model, image, masks, **OPTIONS))
    assert len(states) >= 2 and states[-1].result is not None
    assert all(s.result is None for s in states[:-1])
    assert [s.step for s in states[:-1]] == list(range(1, len(states)))  # one state per sampler step, in order
    assert any(MASKED_PLACEHOLDER in c for c in states[0].captions)  # the first step still has masked tokens
    direct = model.caption_regions(image, masks, **OPTIONS)
    assert states[-1].captions == states[-1].result.captions == direct.captions
    assert states[-1].result.history[-1] == states[-2].captions


def test_caption_stream_stops_the_sampler_when_closed_and_reraises_errors(model, demo_inputs) -> None:
    image, masks = demo_inputs
    stream = caption_stream(model, image, masks, gen_length=32, steps=32)
    assert next(stream).step == 1
    stream.close()
    workers = [t for t in threading.enumerate() if t.name == "perceptiondlm-caption-stream"]
    for worker in workers:
        worker.join(timeout=30)
    assert not any(t.is_alive() for t in workers)
    with pytest.raises(PerceptionDLMError, match="decoding must be one of"):
        list(caption_stream(model, image, masks, decoding="nonsense"))


# ---------------------------------------------------------------- the app
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _app_module() -> ModuleType:
    _import("gradio")
    spec = importlib.util.spec_from_file_location("perceptiondlm_gradio_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app_url(model):
    app = _app_module().launch(model=model, server_port=_free_port(), defaults=OPTIONS, max_tokens=256,
                               play_delay=0.05, prevent_thread_lock=True)
    yield app.local_url
    app.close()


def test_app_main_reports_a_missing_checkpoint(capsys) -> None:
    assert _app_module().main(["--model-path", str(REPO / "no-such-model")]) == 2
    assert "No PerceptionDLM checkpoint" in capsys.readouterr().err
    with pytest.raises(PerceptionDLMError, match="No PerceptionDLM checkpoint"):  # `perceptiondlm demo`'s entry
        serve(REPO / "no-such-model", server_port=_free_port())


def test_api_endpoint_matches_caption_regions(model, app_url, demo_inputs) -> None:
    client_module = _import("gradio_client")
    image, masks = demo_inputs
    client = client_module.Client(app_url, verbose=False)
    files = [client_module.handle_file(str(m)) for m in masks]
    out = client.predict(client_module.handle_file(str(ASSETS_DIR / "demo.png")), files, api_name="/caption",
                         **OPTIONS)
    expected = model.caption_regions(image, masks, **OPTIONS)
    assert out["captions"] == expected.captions
    assert [r["bbox"] for r in out["regions"]] == [[46, 43, 59, 56], [7, 4, 18, 15], [3, 40, 25, 62], [31, 4, 42, 16]]
    assert out["stats"]["nfe"] == expected.stats.nfe
    for bad, message in [({"gen_length": 128}, "Too long a generation"), ({"decoding": "x"}, "decoding must be")]:
        with pytest.raises(client_module.exceptions.AppError, match=message):
            client.predict(client_module.handle_file(str(ASSETS_DIR / "demo.png")), files, api_name="/caption", **bad)


@pytest.fixture
def page(app_url, tmp_path: Path):
    if not CHROMIUM.is_file() and shutil.which("chromium") is None:
        _required(f"Chromium ({CHROMIUM})", "run `bash scripts/install_browser.sh` (Debian's chromium package)")
    sync_api = _import("playwright.sync_api")
    executable = str(CHROMIUM if CHROMIUM.is_file() else shutil.which("chromium"))
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=executable, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        context.set_default_timeout(60_000)
        page = context.new_page()
        page.goto(app_url, wait_until="domcontentloaded")  # Gradio's web-font requests never settle offline
        page.wait_for_selector("#pdlm-run")
        yield page
        context.close()


def _wait_for_message(page, text: str) -> str:
    page.wait_for_function("t => (document.querySelector('#pdlm-message')?.innerText || '').includes(t)", arg=text)
    return page.inner_text("#pdlm-message")


_RECORD_STEPS = """() => { window.pdlmSteps = [];
  new MutationObserver(() => { const c = document.querySelector('#pdlm-cards .pdlm-cards');
    if (c && window.pdlmSteps.at(-1) !== c.dataset.step) window.pdlmSteps.push(c.dataset.step); })
  .observe(document.querySelector('#pdlm-cards'), {subtree: true, childList: true, attributes: true}); }"""


@pytest.mark.slow
def test_browser_preset_run_stream_replay(page, model, demo_inputs, tmp_path: Path) -> None:
    page.click("#pdlm-presets button.thumbnail-item")
    _wait_for_message(page, "Loaded preset")
    page.evaluate(_RECORD_STEPS)
    page.click("#pdlm-run")
    _wait_for_message(page, "Done")
    steps = int(OPTIONS["steps"])
    seen = [int(s) for s in page.evaluate("window.pdlmSteps")]
    assert seen[-1] == steps and any(0 < s < steps for s in seen), seen  # the captions streamed step by step
    cards = page.locator("#pdlm-cards .pdlm-card")
    assert cards.count() == 4
    for i in range(4):
        colour = cards.nth(i).evaluate("e => getComputedStyle(e).borderLeftColor")
        assert colour == "rgb({}, {}, {})".format(*_rgb(PALETTE[i]))
    texts = [cards.nth(i).locator(".pdlm-text").inner_text() for i in range(4)]
    if EMBEDDED:  # the trained tiny model names each region's shape and colour
        for text, obj in zip(texts, make_scene(*DEMO_SCENE).objects, strict=True):
            parsed = parse_caption(text)
            assert (parsed["shape"], parsed["colour"]) == (obj.shape, obj.colour), text
    assert "NFE" in page.inner_text("#pdlm-stats") and "TPF" in page.inner_text("#pdlm-stats")
    with page.expect_download() as download:
        page.click("#pdlm-json")
    result = json.loads(Path(download.value.path()).read_text())
    assert result["captions"] == model.caption_regions(*demo_inputs, **OPTIONS).captions  # the page loses no pixel
    assert [r["caption"] for r in result["regions"]] == result["captions"] and result["stats"]["nfe"] == steps
    page.fill("#pdlm-step input[type=range]", "1")  # scrub back to the first step: masked tokens are dots
    page.wait_for_selector('#pdlm-cards .pdlm-cards[data-step="1"]')
    assert page.locator("#pdlm-cards .pdlm-dot").count() > 0
    page.click("#pdlm-play")  # the replay runs to the last step
    page.wait_for_selector(f'#pdlm-cards .pdlm-cards[data-step="{steps}"]')
    time.sleep(0.5)
    page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
    if os.environ.get("PERCEPTIONDLM_UPDATE_SCREENSHOT") == "1":
        shutil.copy(tmp_path / "demo.png", REPO / "docs" / "demo.png")


@pytest.mark.slow
def test_browser_bad_input_shows_a_message_and_the_app_keeps_serving(page) -> None:
    page.click("#pdlm-run")
    assert "No image" in _wait_for_message(page, "No image")
    page.set_input_files("#pdlm-image input[type=file]", str(ASSETS_DIR / "demo.png"))
    page.wait_for_selector("#pdlm-image img")
    page.click("#pdlm-run")
    assert "No region" in _wait_for_message(page, "No region")
    assert "Traceback" not in page.inner_text("body")
    page.click("#pdlm-presets button.thumbnail-item")  # the same session still works
    _wait_for_message(page, "Loaded preset")
    page.click("#pdlm-run")
    _wait_for_message(page, "Done")
    assert page.locator("#pdlm-cards .pdlm-card").count() == 4


@pytest.mark.slow
def test_browser_brush_stroke_is_a_region(page) -> None:
    page.set_input_files("#pdlm-image input[type=file]", str(ASSETS_DIR / "demo.png"))
    page.wait_for_selector("#pdlm-image img")
    page.get_by_role("tab", name="Draw").click()
    page.click("#pdlm-editor button[aria-label=Brush]")
    box = page.locator("#pdlm-editor canvas").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.38, box["y"] + box["height"] * 0.8)
    time.sleep(0.2)  # the canvas takes the pointer in a frame or two
    page.mouse.down()
    for k in range(1, 6):  # a short stroke over the blue triangle
        page.mouse.move(box["x"] + box["width"] * (0.38 + 0.008 * k), box["y"] + box["height"] * 0.8)
    page.mouse.up()
    time.sleep(0.5)
    page.click("#pdlm-run")
    page.wait_for_function("() => /Done|⚠️/.test(document.querySelector('#pdlm-message')?.innerText || '')")
    assert "Done: 1 captions" in page.inner_text("#pdlm-message")
    assert page.locator("#pdlm-cards .pdlm-card").count() == 1
