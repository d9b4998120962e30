"""Gradio demo of PerceptionDLM (spec §6): give regions (mask files, brush layers or a preset), watch every
region's caption denoise in parallel, replay the steps. `python demo/gradio/app.py [--model-path DIR]`.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from perceptiondlm import PerceptionDLM
from perceptiondlm.demo import (
    ASSETS_DIR,
    DEMO_CSS,
    MAX_GENERATION_TOKENS,
    PALETTE,
    caption_cards_html,
    caption_stream,
    check_generation,
    collect_regions,
    default_options,
    file_path,
    overlay,
    preset_gallery,
    resolve_model_path,
    result_json,
    stats_markdown,
)
from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.inference import DECODING_MODES, MASKED_PLACEHOLDER
from perceptiondlm.processing.masks import load_mask
from perceptiondlm.processing.processor import load_image

logger = logging.getLogger("perceptiondlm.demo")


def build_app(model: Any, *, assets: Path = ASSETS_DIR, defaults: dict[str, int] | None = None,
              max_tokens: int = MAX_GENERATION_TOKENS, play_delay: float = 0.25,
              notice: str | None = None) -> gr.Blocks:
    """The demo's page around a loaded model; events that use the model run one at a time."""
    defaults = {**default_options(model), **(defaults or {})}
    presets = preset_gallery(assets)
    thumbnails = [(overlay(load_image(p.image, p.name), [load_mask(m) for m in p.masks]), p.name) for p in presets]
    outdir = Path(tempfile.mkdtemp(prefix="perceptiondlm-demo-"))

    def brush(size: int | str = "auto") -> gr.Brush:
        return gr.Brush(default_size=size, colors=list(PALETTE), default_color=PALETTE[0], color_mode="defaults")

    def decoding_options(prompt: str, gen_length: float, steps: float, decoding: str, threshold: float,
                         temperature: float) -> dict[str, Any]:
        return dict(prompt=(prompt or "").strip() or None, gen_length=int(gen_length), steps=int(steps),
                    decoding=decoding, threshold=float(threshold), temperature=float(temperature))

    def run(image, mask_files, editor, prompt, gen_length, steps, decoding, threshold, temperature):
        # outputs: overlay, cards, stats, message, replay slider, play button, JSON download, history
        skip = gr.skip()
        try:
            masks = collect_regions(image, mask_files, editor)
            check_generation(len(masks), int(gen_length), max_tokens)
            options = decoding_options(prompt, gen_length, steps, decoding, threshold, temperature)
            hidden = gr.update(visible=False)
            yield (overlay(image, masks), caption_cards_html([MASKED_PLACEHOLDER * int(gen_length)] * len(masks), 0),
                   "", f"Denoising {len(masks)} regions…", hidden, hidden, hidden, None)
            for state in caption_stream(model, image, masks, **options):
                if state.result is None:
                    yield skip, caption_cards_html(state.captions, state.step), skip, skip, skip, skip, skip, skip
                    continue
                history = state.result.history or [state.captions]
                path = Path(tempfile.mkdtemp(dir=outdir)) / "perceptiondlm-result.json"  # one folder per run
                path.write_text(json.dumps(result_json(state.result, masks), indent=2, ensure_ascii=False))
                steps_done = len(history)
                slider = gr.update(minimum=1, maximum=steps_done, value=steps_done, visible=True, interactive=True)
                yield (skip, caption_cards_html(state.captions, steps_done, steps_done),
                       stats_markdown(state.result.stats), f"Done: {len(masks)} captions in {steps_done} steps.",
                       slider, gr.update(visible=True), gr.update(value=str(path), visible=True), history)
        except PerceptionDLMError as err:
            gr.Warning(str(err))
            yield skip, skip, skip, f"⚠️ {err}", skip, skip, skip, skip
        except Exception as err:  # the page shows a message, the log keeps the traceback; the app keeps serving
            logger.exception("demo run failed")
            gr.Warning(f"Unexpected error: {type(err).__name__}: {err}")
            yield skip, skip, skip, f"⚠️ Unexpected error: {type(err).__name__}: {err}", skip, skip, skip, skip

    def show_step(history: list[list[str]] | None, step: float) -> Any:
        if not history:
            return gr.skip()
        index = min(max(int(step), 1), len(history))
        return caption_cards_html(history[index - 1], index, len(history))

    def play(history: list[list[str]] | None):
        for index in range(1, len(history or []) + 1):
            yield gr.update(value=index), caption_cards_html(history[index - 1], index, len(history))
            time.sleep(play_delay)

    def load_preset(evt: gr.SelectData):
        preset = presets[evt.index]
        image = load_image(preset.image, preset.name)
        masks = [load_mask(m, image.size) for m in preset.masks]
        return (image, [str(m) for m in preset.masks], overlay(image, masks),
                f"Loaded preset **{preset.name}**: {len(masks)} regions. Press **Run**.")

    def editor_background(image: Image.Image | None) -> Any:
        if image is None:
            return None
        size = max(2, max(image.size) // 16)  # "auto" paints a fifth of a 64-px image at once
        return gr.update(value={"background": image, "layers": [], "composite": image}, brush=brush(size))

    def caption(image: gr.FileData, masks: list[gr.FileData], prompt: str = "",
                gen_length: int = defaults["gen_length"], steps: int = defaults["steps"], decoding: str = "reference",
                threshold: float = 0.9, temperature: float = 0.0) -> dict[str, Any]:
        """Captions the regions of an image: an image file and one mask file per region (white = region).
        Returns {"captions": [...], "regions": [{"index", "label", "caption", "bbox", "colour"}], "stats": {...}}."""
        try:
            picture = load_image(file_path(image), "image") if image is not None else None
            regions = collect_regions(picture, masks)
            check_generation(len(regions), int(gen_length), max_tokens)
            options = decoding_options(prompt, gen_length, steps, decoding, threshold, temperature)
            return result_json(model.caption_regions(picture, regions, **options), regions)
        except PerceptionDLMError as err:
            raise gr.Error(str(err)) from err

    with gr.Blocks(title="PerceptionDLM demo", analytics_enabled=False) as app:
        gr.Markdown("# PerceptionDLM: every region's caption in one denoising process\n"
                    "Give an image and regions (mask files, brush layers — one layer or colour per region — or a "
                    "preset), press **Run** and watch the captions denoise in parallel.")
        if notice:
            gr.Markdown(f"> ℹ️ {notice}", elem_id="pdlm-notice")
        history = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                # PNG everywhere: Gradio's default WebP is lossy and would change the pixels the model sees.
                image = gr.Image(label="Image", type="pil", image_mode="RGB", sources=["upload", "clipboard"],
                                 format="png", elem_id="pdlm-image", height=320)
                with gr.Tabs():
                    with gr.Tab("Presets", id="presets"):
                        gr.Markdown("Click a preset to load its image and region masks.")
                        gallery = gr.Gallery(value=thumbnails or None, label="Presets", show_label=False, columns=4,
                                             fit_columns=False, allow_preview=False, height=200, format="png",
                                             object_fit="contain", elem_id="pdlm-presets")
                    with gr.Tab("Mask files", id="files"):
                        mask_files = gr.File(label="Region masks (one image per region, white = region)",
                                             file_count="multiple", file_types=["image"], type="filepath",
                                             elem_id="pdlm-mask-files")
                    with gr.Tab("Draw", id="draw"):
                        gr.Markdown("Paint each region on its own layer (or in its own brush colour). "
                                    "Drawn regions are added after the mask files.")
                        editor = gr.ImageEditor(
                            label="Brush regions", type="numpy", image_mode="RGBA", format="png", sources=[],
                            transforms=[], layers=gr.LayerOptions(allow_additional_layers=True, layers=["region 1"]),
                            brush=brush(), eraser=gr.Eraser(), elem_id="pdlm-editor", height=360)
                with gr.Accordion("Decoding", open=True):
                    prompt = gr.Textbox(label="Prompt (empty = the question the model was trained with)", lines=1)
                    with gr.Row():
                        gen_length = gr.Slider(8, 128, value=defaults["gen_length"], step=8, label="Gen length "
                                               "(tokens per region)", elem_id="pdlm-gen-length")
                        steps = gr.Slider(1, 128, value=defaults["steps"], step=1, label="Steps (reference)",
                                          elem_id="pdlm-steps")
                    with gr.Row():
                        decoding = gr.Radio(list(DECODING_MODES), value="reference", label="Decoding")
                        threshold = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="τ (threshold decoding)",
                                              visible=False)
                        temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.1, label="Temperature (0 = greedy)")
                    gr.Markdown(f"At most {max_tokens} answer tokens per run (gen length × regions).")
                run_button = gr.Button("Run", variant="primary", elem_id="pdlm-run")
            with gr.Column(scale=1):
                message = gr.Markdown("", elem_id="pdlm-message")
                regions_view = gr.Image(label="Regions", type="pil", format="png", interactive=False,
                                        elem_id="pdlm-overlay", height=320)
                cards = gr.HTML("", elem_id="pdlm-cards")
                stats = gr.Markdown("", elem_id="pdlm-stats")
                with gr.Row():
                    step_slider = gr.Slider(1, 2, value=1, step=1, label="Replay step", visible=False,
                                            elem_id="pdlm-step")
                    play_button = gr.Button("▶ Play", visible=False, elem_id="pdlm-play", scale=0)
                download = gr.DownloadButton("Download JSON", visible=False, elem_id="pdlm-json")

        model_event = dict(concurrency_id="model", concurrency_limit=1)
        ui_only = dict(api_visibility="private")
        decoding.change(lambda mode: gr.update(visible=mode == "threshold"), decoding, threshold, **ui_only)
        image.change(editor_background, image, editor, **ui_only)
        gallery.select(load_preset, None, [image, mask_files, regions_view, message], **ui_only)
        run_button.click(run, [image, mask_files, editor, prompt, gen_length, steps, decoding, threshold, temperature],
                         [regions_view, cards, stats, message, step_slider, play_button, download, history],
                         **ui_only, **model_event)
        step_slider.input(show_step, [history, step_slider], cards, show_progress="hidden", **ui_only)
        play_button.click(play, history, [step_slider, cards], show_progress="hidden", **ui_only)
        gr.api(caption, api_name="caption", **model_event)
    return app


def launch(model_path: str | Path | None = None, *, model: Any = None, server_name: str = "127.0.0.1",
           server_port: int = 7860, assets: Path = ASSETS_DIR, defaults: dict[str, int] | None = None,
           max_tokens: int = MAX_GENERATION_TOKENS, play_delay: float = 0.25,
           prevent_thread_lock: bool = False) -> gr.Blocks:
    """Loads the model (unless given) and serves the demo; returns at once with `prevent_thread_lock`."""
    notice = None
    if model is None:
        path, notice = resolve_model_path(model_path)
        if notice:
            logger.warning(notice)
        model = PerceptionDLM.from_pretrained(path).eval()
    app = build_app(model, assets=Path(assets), defaults=defaults, max_tokens=max_tokens, play_delay=play_delay,
                    notice=notice)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=server_name, server_port=server_port, prevent_thread_lock=prevent_thread_lock,
               css=DEMO_CSS, allowed_paths=[str(assets)], show_error=False, quiet=prevent_thread_lock)
    return app


def main(argv: list[str] | None = None) -> int:
    """`python demo/gradio/app.py [options]` = `perceptiondlm demo [options]` (one command line, in cli.py)."""
    from perceptiondlm.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
