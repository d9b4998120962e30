"""Evaluation suite: the scorer by hand, the answer parser, the OpenAI-compatible judge against a local HTTP server,
the rule judge, the region-benchmark runner on the ParaDLC sample with the tiny checkpoint, and the VLMEvalKit
adapter tested against its interface (VLMEvalKit itself cannot be installed here)."""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, write_base_checkpoint
from PIL import Image

from perceptiondlm import PerceptionDLM, PerceptionDLMError
from perceptiondlm.evaluation import judges, regionbench, scoring, vlmevalkit
from perceptiondlm.evaluation.judges import OpenAIJudge, RuleJudge, judge_and_score, parse_answer
from perceptiondlm.evaluation.regionbench import load_annotations, run_benchmark, summary_path

SAMPLE = FIXTURES / "paradlc-sample"
CHECKPOINT = FIXTURES / "pdmllm" / "checkpoint"
REPO = Path(__file__).resolve().parents[1]
FAST = dict(gen_length=4, steps=4, progress=False)


# --- scoring -------------------------------------------------------------------------------------------------

def q(kind: str, *scores: float) -> dict:
    return {"question": "Which?", "choices": [[f"option {s}", s] for s in scores], "type": kind}


QA = {
    # recognised; pos: 1 (A) and 0.5 (D) -> 0.75; neg: 1 (B) and unparseable -> 0 -> 0.5
    "a": [q("positive", 1, 0, -1, 0.5), q("positive", 1, 0, -1, 0.5), q("negative", -1, 1), q("negative", -1, 0, 1)],
    # NOT recognised: every score clamped to <= 0. pos: 1 -> 0 and -1 -> -1 -> -0.5; neg: 1 -> 0 -> 0
    "b": [q("positive", 1, 0, -1, 0.5), q("positive", 1, 0, -1, 0.5), q("negative", -1, 1)],
    # recognised, no positive question (pos counts 0 by default); neg: 1 and 1 -> 1
    "c": [q("negative", -1, 1), q("negative", -1, 0, 1)],
}
ANSWERS = {"a": {"recognition": 0, "answers": [0, 3, 1, None]},
           "b": {"recognition": 1, "answers": [0, 2, 1]},
           "c": {"recognition": 0, "answers": [1, 2]}}


def test_scorer_matches_the_hand_computed_numbers(tmp_path):
    report = scoring.score_benchmark(QA, ANSWERS, {"a": "Boat", "b": "boat", "c": "person"})
    assert report["regions"]["a"]["pos"] == 0.75 and report["regions"]["a"]["neg"] == 0.5
    assert report["regions"]["b"]["pos"] == -0.5 and report["regions"]["b"]["neg"] == 0.0
    assert report["regions"]["c"]["pos"] is None and report["regions"]["c"]["neg"] == 1.0
    # avg_pos = (0.75 - 0.5 + 0) / 3 = 1/12; avg_neg = (0.5 + 0 + 1) / 3 = 0.5; Avg = (1/12 + 1/2) / 2 = 7/24
    assert report["avg_pos"] == pytest.approx(100 / 12)
    assert report["avg_neg"] == pytest.approx(50.0)
    assert report["avg"] == pytest.approx(100 * 7 / 24)  # 29.17
    # without the no-positive region: avg_pos = (0.75 - 0.5) / 2 = 0.125; Avg = (0.125 + 0.5) / 2 = 0.3125
    assert report["avg_pos_excluding_no_positive"] == pytest.approx(12.5)
    assert report["avg_excluding_no_positive"] == pytest.approx(31.25)
    assert (report["n_unparsed"], report["n_recognition_failed"], report["n_no_positive"]) == (1, 1, 1)
    # per category (lower-cased): boat = a, b: pos (0.75 - 0.5)/2 = 0.125, neg (0.5 + 0)/2 = 0.25, avg 0.1875
    boat, person = report["categories"]["boat"], report["categories"]["person"]
    assert (boat["avg_pos"], boat["avg_neg"], boat["avg"]) == pytest.approx((12.5, 25.0, 18.75))
    assert (person["avg_pos"], person["avg_neg"], person["avg"]) == pytest.approx((0.0, 100.0, 50.0))
    scoring.write_report(report, tmp_path / "r.json", tmp_path / "r.md")
    assert json.loads((tmp_path / "r.json").read_text())["avg"] == pytest.approx(100 * 7 / 24)
    assert "| published protocol | 8.3 | 50.0 | 29.2 |" in (tmp_path / "r.md").read_text()


def test_scorer_gates_unparseable_recognition_and_checks_inputs():
    region = scoring.score_region([q("positive", 1, 0, -1, 0.5)], None, [0])  # unparseable recognition: gate closed
    assert region["pos"] == 0.0 and region["recognition_unparsed"] and not region["recognized"]
    assert scoring.score_region([q("positive", 1, 0)], 0, [7])["n_unparsed"] == 1  # no such option: unparsed
    with pytest.raises(PerceptionDLMError, match="no judge answers"):
        scoring.score_benchmark(QA, {"a": ANSWERS["a"]})
    assert scoring.score_benchmark(QA, {"a": ANSWERS["a"]}, missing="skip")["missing"] == ["b", "c"]
    with pytest.raises(PerceptionDLMError, match="2 answers for 4 questions"):
        scoring.score_benchmark({"a": QA["a"]}, {"a": {"recognition": 0, "answers": [0, 0]}})


def test_answer_parser_follows_the_published_rules():
    choices = ["The boat is red.", "The boat is not mentioned.", "The boat is blue."]
    assert parse_answer("The boat is blue.", choices) == 2
    assert parse_answer("b. the boat is not mentioned.", choices) == 1
    assert parse_answer("C", choices) == 2
    assert parse_answer("Answer: the boat is red.", choices) == 0  # unique substring
    assert parse_answer("B. something else", choices) == 1  # "x." prefix
    assert parse_answer("the boat is blue. no, the boat is red.", choices) == 0  # last occurrence wins
    assert parse_answer("not mentioned", choices) == 1  # the answer inside one choice
    assert parse_answer("c\nbecause", choices) == 2
    assert parse_answer("I cannot tell", choices) is None and parse_answer("", choices) is None
    assert parse_answer(None, ["Yes", "No"]) is None and parse_answer("Yes.", ["Yes", "No"]) == 0


# --- OpenAI-compatible judge against a local server ----------------------------------------------------------

class JudgeServer:
    """A chat-completions endpoint on 127.0.0.1: checks each request, answers deterministically, can fail with
    a 500 or stall past the client's timeout on chosen request numbers."""

    def __init__(self, model: str, images: bool) -> None:
        self.model, self.images = model, images
        self.requests: list[dict] = []
        self.errors: list[str] = []
        self.fail_500, self.stall = set(), set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                    number = len(server.requests)
                if number in server.stall:
                    time.sleep(2.0)
                if number in server.fail_500:
                    return self.reply(500, {"error": {"message": "boom", "type": "server_error"}})
                problem = server.check(self.path, body)
                if problem:
                    server.errors.append(problem)
                    return self.reply(400, {"error": {"message": problem, "type": "invalid_request_error"}})
                self.reply(200, {"id": f"c{number}", "object": "chat.completion", "created": 0, "model": server.model,
                                 "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                     "role": "assistant", "content": server.answer(body)}}]})

            def reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads, self.httpd.block_on_close = True, False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def check(self, path: str, body: dict) -> str | None:
        if path != "/v1/chat/completions" or body.get("model") != self.model:
            return f"bad path/model {path} {body.get('model')}"
        (message,) = body["messages"]
        content = message["content"]
        if not self.images:
            return None if message["role"] == "user" and isinstance(content, str) else "expected text only"
        urls = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
        if len(urls) != 2 or not all(u.startswith("data:image/png;base64,") for u in urls):
            return f"expected two PNG images, got {len(urls)}"
        for url in urls:
            Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).verify()
        return None

    @staticmethod
    def text(body: dict) -> str:
        content = body["messages"][0]["content"]
        return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)

    def answer(self, body: dict) -> str:
        prompt = self.text(body)
        if "UNPARSEABLE_ALL" in prompt:
            return "Maybe?"  # ("I cannot tell" would parse as "No": "no" occurs in "cannot")
        if "Is it likely" in prompt or "Judging from the image" in prompt:
            return "Yes"
        if "UNPARSEABLE" in prompt:
            return "I cannot tell"
        return "A" if "\nC. " in prompt else "b"  # 3-4 choices: A; 2 choices: B

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def image_server():
    server = JudgeServer("judge-x", images=True)
    yield server
    server.close()


def make_images(records, root: Path, *, skip: tuple[str, ...] = (), size: dict | None = None) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for record in records:
        if record.image_id in skip:
            continue
        w, h = (size or {}).get(record.image_id, (record.width, record.height))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / record.file_name)


def test_openai_judge_retries_caches_and_limits_calls(tmp_path, image_server, monkeypatch):
    records = load_annotations(SAMPLE / "annotations.json")[:1]  # image 1592452: regions _12 (8 q) and _13 (7 q)
    make_images(records, tmp_path / "images")
    qa = {k: v for k, v in json.loads((SAMPLE / "qa.json").read_text()).items() if k.startswith("1592452_")}
    preds = {"1592452_12": "A boat with blue lights.", "1592452_13": "UNPARSEABLE bridge"}
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")

    def run(limit: int = 100, cache: str = "cache.json"):
        judge = OpenAIJudge("judge-x", base_url=image_server.url, with_images=True, concurrency=3, timeout=0.6,
                            backoff=0.01, api_call_limit=limit, cache_path=tmp_path / cache)
        return judge_and_score(judge, preds, qa, SAMPLE / "class_names.json", annotations=records,
                               image_root=tmp_path / "images", output_path=tmp_path / "eval.json", progress=False)

    image_server.fail_500, image_server.stall = {1}, {2}
    report = run()
    assert image_server.errors == []
    assert len(image_server.requests) == 2 + 15 + 2  # recognition x2, 15 questions, the 500 and the timeout retried
    assert {r["auth"] for r in image_server.requests} == {"Bearer sk-test"}
    # _12: recognised, positives answered A -> 1 each (pos 1); negatives: 2-choice "b" -> 1, 3-choice "A" -> -1
    # (neg (1 + 1 - 1 - 1) / 4 = 0). _13: every answer unparseable -> 0 (7 counted). avg_pos 50, avg_neg 0, Avg 25.
    assert (report["avg_pos"], report["avg_neg"], report["avg"]) == pytest.approx((50.0, 0.0, 25.0))
    assert report["n_unparsed"] == 7 and report["n_recognition_failed"] == 0
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["judgements"]["1592452_13"]["responses"][1] == {"response": "I cannot tell", "choice": None}
    assert (tmp_path / "eval.md").is_file()

    before = len(image_server.requests)
    assert run()["avg"] == pytest.approx(25.0)  # rerun: everything from the cache
    assert len(image_server.requests) == before

    with pytest.raises(PerceptionDLMError, match="API-call limit 3 reached"):
        run(limit=3, cache="fresh.json")
    assert len(image_server.requests) == before + 3
    assert len(json.loads((tmp_path / "fresh.json").read_text())) == 3  # the answers obtained are kept


def test_text_only_judge_and_unparseable_recognition(tmp_path):
    server = JudgeServer("llama3.1-8b", images=False)
    try:
        qa = {"7": [q("positive", 1, 0, -1, 0.5), q("negative", -1, 1)], "8": [q("negative", -1, 1)]}
        key_file = tmp_path / "key.txt"
        key_file.write_text("sk-api\n")
        judge = OpenAIJudge("llama3.1-8b", base_url=server.url, api_key_file=key_file, backoff=0.01)
        report = judge_and_score(judge, {"7": "a red bus", "8": "UNPARSEABLE_ALL"}, qa, {"7": "bus", "8": "Sneakers"},
                                 progress=False)
        assert server.errors == [] and {r["auth"] for r in server.requests} == {"Bearer sk-api"}
        prompts = [JudgeServer.text(r["body"]) for r in server.requests]
        assert any("is a bus or an object" in p for p in prompts)  # "bus" is singular (as the published scorer)
        assert any("objects in the description are Sneakers" in p for p in prompts)
        # 7: pos "A" -> 1, neg "b" -> 1. 8: recognition unparseable -> gate closed, answer unparseable -> 0.
        assert report["regions"]["7"]["pos"] == 1.0
        assert report["n_recognition_unparsed"] == 1 and report["n_recognition_failed"] == 1
        assert (report["avg_pos"], report["avg_neg"]) == pytest.approx((50.0, 50.0))
    finally:
        server.close()


def test_no_api_key_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("AZURE_OPENAI_KEY", raising=False)
    with pytest.raises(PerceptionDLMError, match="No API key"):
        OpenAIJudge("gpt", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(PerceptionDLMError, match="AZURE_OPENAI_KEY"):
        OpenAIJudge("gpt", azure_endpoint="https://example.invalid")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "AZURE_OPENAI_KEY")}
    done = subprocess.run([sys.executable, str(REPO / "evaluation" / "DLC-Bench" / "judge.py"), "--pred",
                           str(tmp_path / "not-there.json")], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0 and "No API key" in done.stderr  # before the predictions are even read


def test_rule_judge_keyword_default_and_custom_rules():
    qa = {"r": [{"question": "Which?", "type": "positive", "choices": [
        ["The boat is red", 1], ["The boat is not mentioned", 0], ["The boat is blue", -1]]}]}
    # recognition: "boat" occurs -> Yes; choice 0 has all its words in the caption -> score 1
    report = judge_and_score(RuleJudge(), {"r": "A red boat on the water."}, qa, {"r": "Boats"}, progress=False)
    assert report["avg_pos"] == 100.0 and report["n_recognition_failed"] == 0
    report = judge_and_score(RuleJudge(lambda caption, question, choices, record: 7), {"r": "x"}, qa, {"r": "boat"},
                             progress=False)
    assert report["n_unparsed"] == 1 and report["n_recognition_unparsed"] == 1  # out of range: counted, no crash


# --- the region-benchmark runner -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model() -> PerceptionDLM:
    return PerceptionDLM.from_pretrained(CHECKPOINT).eval()


def count_calls(monkeypatch, model) -> list[list[str]]:
    seen: list[int] = []
    original = model.caption_regions

    def wrapper(image, masks, **kwargs):
        seen.append(len(masks))
        return original(image, masks, **kwargs)

    monkeypatch.setattr(model, "caption_regions", wrapper)
    return seen


class Interrupted(Exception):
    pass


def test_runner_captions_every_region_once_and_resumes(tmp_path, model, monkeypatch):
    records = load_annotations(SAMPLE / "annotations.json")
    keys = [r.key for record in records for r in record.regions]
    make_images(records, tmp_path / "images")
    out = tmp_path / "out" / "captions.json"

    def stop(record, captions):
        raise Interrupted

    with pytest.raises(Interrupted):  # interrupted after the first image
        run_benchmark(model, SAMPLE / "annotations.json", tmp_path / "images", out, on_image=stop, **FAST)
    first = json.loads(out.read_text())
    assert sorted(first) == ["1592452_12", "1592452_13"]
    out.write_text(json.dumps({k: "KEPT" for k in first}))  # a recomputed caption would overwrite this
    seen = count_calls(monkeypatch, model)
    summary = run_benchmark(model, records, tmp_path / "images", out, save_every=1, **FAST)
    captions = json.loads(out.read_text())
    assert sorted(captions) == sorted(keys) and len(keys) == 18
    assert all(out.read_text().count(f'"{k}"') == 1 for k in keys)
    assert captions["1592452_12"] == captions["1592452_13"] == "KEPT"
    assert seen == [3, 5, 6, 2]  # only the unfinished images; chunks of prompt_numbers = 6 in annotation order
    saved = json.loads(summary_path(out).read_text())
    assert saved["n_calls"] == 5 and saved["n_regions_captioned"] == 18 and saved["n_images_captioned"] == 4
    assert saved["nfe"] == 5 * 4 and saved["tpf"] == pytest.approx(18 * 4 / 20)  # K*g / NFE, as the paper
    assert saved["generation_seconds"] > 0 and saved["regions_per_second"] > 0 and saved["skipped_images"] == []
    assert summary["n_outputs"] == 18
    with pytest.raises(PerceptionDLMError, match="other settings .steps"):
        run_benchmark(model, records, tmp_path / "images", out, gen_length=4, steps=2, progress=False)


def test_runner_on_coco_annotations_skips_missing_images_and_runs_sequentially(tmp_path, model, monkeypatch,
                                                                              caplog):
    first = json.loads((SAMPLE / "annotations.json").read_text())[0]
    size = {"height": first["height"], "width": first["width"]}
    coco = {"images": [{"id": 5, "file_name": first["file_name"], **size}, {"id": 6, "file_name": "gone.jpg", **size}],
            "annotations": [{"id": 100 + i, "image_id": 5, "category_id": 1, "segmentation": a["mask_rle"]}
                            for i, a in enumerate(first["annotations"])]
            + [{"id": 300, "image_id": 5, "category_id": 2, "segmentation": [[10, 10, 60, 10, 60, 50, 10, 50]]},
               {"id": 400, "image_id": 6, "category_id": 2, "segmentation": first["annotations"][0]["mask_rle"]}],
            "categories": [{"id": 1, "name": "boat"}, {"id": 2, "name": "box"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    loaded = load_annotations(tmp_path / "coco.json")
    assert [(r.key, r.category) for r in loaded[0].regions] == [("100", "boat"), ("101", "boat"), ("300", "box")]
    assert regionbench.mask_array(loaded[0].regions[2]).sum() == 50 * 40  # polygon -> RLE
    make_images(loaded[:1], tmp_path / "images")
    seen = count_calls(monkeypatch, model)
    with caplog.at_level(logging.WARNING):
        summary = run_benchmark(model, tmp_path / "coco.json", tmp_path / "images", tmp_path / "d.json",
                                sequential=True, region_filter={"100", "300", "400"}, prompt="Describe it.", **FAST)
    assert seen == [1, 1] and summary["tpf"] == 1.0 and summary["prompt"] == "Describe it."
    assert sorted(json.loads((tmp_path / "d.json").read_text())) == ["100", "300"]
    assert [(s["image_id"], s["regions"], s["reason"]) for s in summary["skipped_images"]] == [
        ("6", ["400"], "image file not found")]
    assert "differs from the one the model was trained with" in caplog.text
    summary = run_benchmark(model, loaded[:1], tmp_path / "images", tmp_path / "b.json", chunking="batched", **FAST)
    assert seen[2:] == [3] and summary["n_calls"] == 1  # every region of the image in one call
    with pytest.raises(PerceptionDLMError, match="chunking"):
        run_benchmark(model, loaded[:1], tmp_path / "images", tmp_path / "x.json", chunking="nope", **FAST)


def test_runner_rejects_bad_annotations_and_mismatched_masks(tmp_path, model, monkeypatch):
    (tmp_path / "neither.json").write_text(json.dumps({"regions": []}))
    with pytest.raises(PerceptionDLMError, match="neither a ParaDLC-Bench annotation file"):
        load_annotations(tmp_path / "neither.json")
    data = json.loads((SAMPLE / "annotations.json").read_text())
    bad = copy.deepcopy(data)
    bad[0]["annotations"][1]["mask_rle"]["size"] = [100, 200]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(PerceptionDLMError, match=r"region 1592452_13: RLE size \[100, 200\]"):
        load_annotations(tmp_path / "bad.json")
    records = load_annotations(SAMPLE / "annotations.json")[:2]
    make_images(records, tmp_path / "images", size={"1592437": (320, 240)})  # same aspect, other size
    seen = count_calls(monkeypatch, model)
    with pytest.raises(PerceptionDLMError, match="3 region masks differ in size.*1592437_0 .RLE 640x480, image 320x24"):
        run_benchmark(model, records, tmp_path / "images", tmp_path / "e.json", **FAST)
    assert seen == [] and not (tmp_path / "e.json").exists()  # checked before any inference


# --- VLMEvalKit adapter (tested against the interface; VLMEvalKit is not installable here) ----------------------

def test_vlmevalkit_settings_prompts_and_postprocessing():
    assert "vlmeval" not in sys.modules  # importing the adapter does not import VLMEvalKit
    assert vlmevalkit.generation_config("MMStar")["steps"] == 2
    assert vlmevalkit.generation_config("MMBench_DEV_EN_V11")["gen_length"] == 2
    config = vlmevalkit.generation_config("MathVista_MINI")
    assert (config["steps"], config["gen_length"], config["block_length"]) == (256, 256, 1)
    assert vlmevalkit.generation_config("ChartQA_TEST")["block_length"] == 128
    assert vlmevalkit.generation_config(None) == vlmevalkit.DEFAULT_GENERATION
    assert [vlmevalkit.tiles_per_image(n) for n in (1, 2, 10, 11, 40, 100)] == [6, 6, 6, 5, 1, 1]
    assert vlmevalkit.tiles_per_image(1, video=True) == 1

    line = {"question": "What is it?", "hint": "Look closely.", "A": "cat", "B": "dog", "C": math.nan}
    assert vlmevalkit.build_prompt(line, "MMStar") == (
        "Look closely.\nWhat is it?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly.")
    chinese = {"question": "这是什么?", "A": "猫", "B": "狗"}
    assert vlmevalkit.build_prompt(chinese, "MMBench_DEV_CN").endswith("请直接回答选项字母。")
    assert vlmevalkit.build_prompt({"question": "Is it red?"}, "HallusionBench") == (
        "Is it red? Please answer yes or no. Answer the question using a single word or phrase.")
    assert vlmevalkit.build_prompt({"question": "Total?"}, "ChartQA_TEST").endswith(
        "\n\nPlease reason step by step, and answer the question using a single word or phrase.")
    assert vlmevalkit.build_prompt({"question": "x?"}, "MathVista_MINI") == "x?\n\n\nPlease reason step by step."
    assert vlmevalkit.build_prompt({"question": "Why?"}, "LLaVABench") == "Why?\nAnswer this question in detail."
    assert vlmevalkit.build_prompt({"question": "Why?"}, "SomeVQA") == (
        "Why?\nAnswer the question using a single word or phrase.")
    assert vlmevalkit.use_custom_prompt("MMStar") and not vlmevalkit.use_custom_prompt("MMDU")

    text, image = {"type": "text", "value": "Compare."}, {"type": "image", "value": "a.png"}
    assert vlmevalkit.reorganize_prompt([text, image]) == "<image>\nCompare."
    assert vlmevalkit.reorganize_prompt([image, image, text]) == "Image-1: <image>\nImage-2: <image>\nCompare."
    assert vlmevalkit.reorganize_prompt([text, image, text, image]) == (
        "Image-1: <image>\nImage-2: <image>\nCompare.<Image-1>Compare.<Image-2>")
    assert vlmevalkit.postprocess("Yes<|eot_id|>garbage") == "Yes"
    assert vlmevalkit.postprocess("No.") == "No" and vlmevalkit.postprocess("B. dog") == "B"
    assert vlmevalkit.postprocess("<|im_end|>a long answer") == "a long answer"


class StubModel:
    """Records what the adapter passes to `chat`."""

    def __init__(self) -> None:
        self.processor = types.SimpleNamespace(max_sub_img=12)
        self.calls: list[tuple] = []

    def chat(self, image, question, **kwargs):
        self.calls.append((image, question, kwargs, self.processor.max_sub_img))
        return types.SimpleNamespace(text="A. cat<|eot_id|><|mdm_mask|>")


def test_vlmevalkit_generate_inner_with_a_stub_model(tmp_path):
    cls = vlmevalkit.PerceptionDLMBaseChat
    assert issubclass(cls, vlmevalkit.StandInBaseModel) and cls.INTERLEAVE is True
    stub = StubModel()
    chat = cls(model=stub)
    path = tmp_path / "a.png"
    Image.new("RGB", (30, 20)).save(path)
    message = chat.build_prompt({"question": "What?", "A": "cat", "B": "dog", "image_path": str(path)}, "MMStar")
    assert [m["type"] for m in message] == ["text", "image"]
    assert chat.generate_inner(message, dataset="MMStar") == "A"
    image, question, kwargs, tiles = stub.calls[-1]
    assert image == str(path) and question.startswith("<image>\nWhat?\nA. cat")
    assert (kwargs["steps"], kwargs["gen_length"], kwargs["block_length"], tiles) == (2, 2, 2, 6)
    assert stub.processor.max_sub_img == 12  # restored after the call
    chat.generate_inner([message[1], message[1], message[0]], dataset="BLINK")
    assert stub.calls[-1][0] == [str(path), str(path)] and stub.calls[-1][1].startswith("Image-1: <image>\nImage-2")
    chat.generate_inner(message, dataset="MMMU_DEV_VAL")  # first image upscaled 2x
    assert stub.calls[-1][0].size == (60, 40)
    assert chat.generate("Hello?") == "A" and stub.calls[-1][0] is None


def test_vlmevalkit_class_and_registration_with_a_fake_vlmeval(monkeypatch):
    with pytest.raises(PerceptionDLMError, match="VLMEvalKit is not installed"):
        vlmevalkit.register("/ckpt")

    class BaseModel:
        def __init__(self) -> None:
            self.dump_image_func = None

    fake = {name: types.ModuleType(name) for name in ("vlmeval", "vlmeval.vlm", "vlmeval.vlm.base", "vlmeval.config")}
    fake["vlmeval.vlm.base"].BaseModel = BaseModel
    fake["vlmeval.config"].supported_VLM = {}
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    vlmevalkit._chat_class.cache_clear()
    try:
        entry = vlmevalkit.register("/ckpt/PerceptionDLM-Base")
        assert fake["vlmeval.config"].supported_VLM["PerceptionDLM-Base"] is entry
        assert issubclass(entry.func, BaseModel) and entry.keywords == {"model_path": "/ckpt/PerceptionDLM-Base"}
        assert entry.func(model=StubModel()).dump_image_func is None  # BaseModel.__init__ ran
    finally:
        vlmevalkit._chat_class.cache_clear()


def test_vlmevalkit_adapter_runs_a_real_tiny_base_model(tmp_path):
    directory = write_base_checkpoint(tmp_path / "base")
    chat = vlmevalkit.PerceptionDLMBaseChat(model_path=directory, device="cpu")
    image = FIXTURES / "pdmllm" / "inputs" / "image.png"
    answer = chat.generate_inner([{"type": "text", "value": "What is it?"}, {"type": "image", "value": str(image)}],
                                 dataset="MMStar")
    assert isinstance(answer, str) and "<|eot_id|>" not in answer


def test_judges_module_exports():
    assert set(judges.__all__) >= {"OpenAIJudge", "RuleJudge", "parse_answer", "judge_and_score", "focal_crops"}
    image = np.zeros((300, 400, 3), dtype=np.uint8)
    mask = np.zeros((300, 400), dtype=bool)
    mask[100:110, 200:220] = True  # box 20x10 -> at least 56x56 around its centre (210, 105), then 3x per side
    crop, crop_mask = judges.focal_crops(image, mask)
    # w = h = 56, x0 = int(210 - 28) = 182, y0 = int(105 - 28) = 77: cols 126..294, rows 21..189
    assert crop.size == (168, 168) and crop_mask.size == (168, 168)
    assert np.asarray(crop_mask).max() == 255


def test_paradlc_inference_script(tmp_path):
    records = load_annotations(SAMPLE / "annotations.json")[:1]
    make_images(records, tmp_path / "images")
    output = tmp_path / "captions.json"
    script = Path(__file__).resolve().parents[1] / "evaluation" / "ParaDLC-Bench" / "infer.py"
    command = [sys.executable, str(script), "--model-path", str(CHECKPOINT), "--anno-json",
               str(SAMPLE / "annotations.json"), "--image-root", str(tmp_path / "images"), "--output", str(output),
               "--gen-length", "4", "--steps", "4", "--dtype", "float32", "--qa-json", str(SAMPLE / "qa.json")]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    captions = json.loads(output.read_text())
    assert sorted(captions) == sorted(r.key for r in records[0].regions)
    assert json.loads(summary_path(output).read_text())["sequential"] is False


def test_base_qa_asks_held_out_attribute_questions_and_scores_exact_answers(tmp_path, model, monkeypatch):
    from perceptiondlm.data.synthetic import attribute_questions, make_scene
    from perceptiondlm.evaluation.synthetic import run_base_qa

    truth = {}
    for i in range(3):
        for question, answer, _ in attribute_questions(make_scene(13, i), np.random.default_rng([13, i, 3]), 2):
            truth[question] = answer
    first = next(iter(truth))

    def fake_chat(image, question, **kwargs):  # right on the first question only, with a trailing period
        return types.SimpleNamespace(text=f" {truth[question]}." if question == first else "no idea")

    monkeypatch.setattr(model, "chat", fake_chat)
    report = run_base_qa(model, n_images=3, questions_per_image=2, output_path=tmp_path / "qa.json")
    assert report["questions"] == len(truth) and report["accuracy"] == pytest.approx(1 / len(truth))
    saved = json.loads((tmp_path / "qa.json").read_text())
    assert [r["question"] for r in saved["records"]] == list(truth) and saved["records"][0]["correct"]
    assert sum(v > 0 for v in report["attribute_accuracy"].values()) == 1


def test_attribute_accuracy_by_cover_splits_partly_covered_regions_from_the_others():
    from perceptiondlm.data.synthetic import ShapeObject, object_caption
    from perceptiondlm.evaluation.synthetic import attribute_accuracy_by_cover

    def obj(colour, covered):
        return ShapeObject(shape="circle", colour=colour, size="small", texture="plain", position="center",
                           centre=(0.0, 0.0), radius=1.0, visible_fraction=0.6 if covered else 1.0)

    truth = {"a": obj("red", True), "b": obj("blue", True), "c": obj("green", False)}
    attributes = {k: o.attributes() for k, o in truth.items()}
    captions = {"a": object_caption(obj("green", True)), "b": object_caption(truth["b"]),
                "c": object_caption(truth["c"])}
    split = attribute_accuracy_by_cover(captions, attributes)
    assert split["partly_covered"]["regions"] == 2 and split["partly_covered"]["colour"] == 0.5
    assert split["unoccluded"] == {"regions": 1, "colour": 1.0, "shape": 1.0, "size": 1.0, "texture": 1.0,
                                   "position": 1.0}
