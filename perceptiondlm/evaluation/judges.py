"""Judges for the region benchmarks: an OpenAI-compatible chat judge (image crops for ParaDLC-Bench, text only
for DLC-Bench) with bounded concurrency, retries, an on-disk cache and a call limit; a deterministic rule judge;
the published answer parser; and `judge_and_score`, which asks every question and scores the answers."""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.evaluation.regionbench import ImageRecord, load_annotations, mask_array
from perceptiondlm.evaluation.scoring import RECOGNITION_CHOICES, score_benchmark, write_report
from perceptiondlm.io import read_json, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = ["JudgeQuery", "Verdict", "parse_answer", "format_question", "recognition_question", "focal_crops",
           "OpenAIJudge", "RuleJudge", "keyword_answer", "judge_and_score", "TEXT_PROMPT", "IMAGE_PROMPT"]

# The published judge instructions (DAM's DLC-Bench scorer; ParaDLC-Bench adds "in this image"), paraphrased.
_RULES = (
    "Answer the multiple-choice question using the text description of an object{where}. Follow these rules:\n"
    "1. Give no reasoning and make no corrections. Output exactly one of the choices for the question, without "
    "repeating the question.\n"
    "2. An exact match is not required: pick the option that fits the description best.\n\n"
    "The description:\n{caption}\n\n"
    "Based on that description, answer this question with one of the choices:\n{question}\n"
)
TEXT_PROMPT = _RULES.replace("{where}", " in an image")
IMAGE_PROMPT = _RULES.replace("{where}", " in this image")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MIN_CROP_SIDE = 56


@dataclass
class JudgeQuery:
    key: str  # region key
    index: int  # 0 = the recognition question, i >= 1 = qa[key][i - 1]
    kind: str  # "recognition" | "positive" | "negative"
    caption: str
    question: str
    choices: list[str]
    class_name: str
    images: tuple[str, str] | None = None  # base64 PNG: focal crop of the image and of the mask


@dataclass
class Verdict:
    response: str | None  # the judge's raw answer (None: no answer was obtained)
    choice: int | None  # parsed option index (None: unparseable)


def parse_answer(response: str | None, choices: Sequence[str]) -> int | None:
    """The published scorer's parser: exact choice text, "x. choice" or a single letter; a unique choice inside
    the answer; an "x." prefix; the last-occurring choice (longest on a tie); the answer inside a choice (longest
    choice); a letter followed by a newline. None when nothing matches (scored 0 by the caller)."""
    pred = (response or "").strip().lower()
    if not pred:
        return None
    found = []  # (index, position, length) of choices that occur in the answer
    for i, choice in enumerate(choices):
        text = choice.strip().lower()
        if pred in (text, f"{LETTERS[i]}. {text}", LETTERS[i]):
            return i
        if text and text in pred:
            found.append((i, pred.index(text), len(text)))
    if len(found) == 1:
        return found[0][0]
    labels = LETTERS[: len(choices)]
    if len(pred) >= 2 and pred[0] in labels and pred[1] == ".":
        return labels.index(pred[0])
    if found:
        last = max(position for _, position, _ in found)
        return max((f for f in found if f[1] == last), key=lambda f: f[2])[0]
    inside = [(i, len(c.strip())) for i, c in enumerate(choices) if pred in c.strip().lower()]
    if inside:
        return max(inside, key=lambda f: f[1])[0]
    if pred[0] in labels and (len(pred) == 1 or pred[1] == "\n"):
        return labels.index(pred[0])
    return None


def format_question(question: str, choices: Sequence[str]) -> str:
    """The question followed by its lettered choices ("A. ...", one per line)."""
    return "\n".join([question, *(f"{LETTERS[i].upper()}. {c}" for i, c in enumerate(choices))])


@functools.cache
def _inflect_engine() -> Any:
    try:
        import inflect
    except ImportError:
        logger.warning("inflect is not installed (pip install inflect): the DLC-Bench recognition question falls "
                       "back to a rough plural/article rule and may differ from the published one")
        return None
    return inflect.engine()


def recognition_question(class_name: str, with_image: bool) -> str:
    """The recognition question: ParaDLC-Bench's image-grounded wording or DLC-Bench's plural-aware one."""
    if with_image:
        return (f"The object in the image is {class_name}. Judging from the image, is the object in the description "
                f"likely to be of the given class, {class_name}, or of a similar type?")
    engine = _inflect_engine()
    if engine is not None:
        plural = class_name != "bus" and engine.singular_noun(class_name) is not False
        with_article = engine.a(class_name)
    else:  # rough fallback without inflect
        plural = class_name.endswith("s") and not class_name.endswith(("ss", "us"))
        with_article = ("an " if class_name[:1].lower() in "aeiou" else "a ") + class_name
    if plural:
        return (f"Is it likely that the objects in the description are {class_name} or objects of a similar type? "
                "It does not need to be an exact match.")
    return (f"Is it likely that the object in the description is {with_article} or an object of a similar type? "
            "It does not need to be an exact match.")


def focal_crops(image: np.ndarray, mask: np.ndarray) -> tuple[Image.Image, Image.Image]:
    """The published judge's focal crop: the mask's box (each side at least 56 px, same centre), expanded by one
    box size on every side and clipped to the image; returns the image crop and the (0/255) mask crop."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise PerceptionDLMError("cannot crop around an empty mask")
    x0, y0 = int(xs.min()), int(ys.min())
    w, h = int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0
    xc, yc = x0 + w / 2, y0 + h / 2
    w, h = max(w, MIN_CROP_SIDE), max(h, MIN_CROP_SIDE)
    x0, y0 = int(xc - w / 2), int(yc - h / 2)
    rows = slice(max(y0 - h, 0), min(y0 + 2 * h, mask.shape[0]))
    cols = slice(max(x0 - w, 0), min(x0 + 2 * w, mask.shape[1]))
    return Image.fromarray(image[rows, cols]), Image.fromarray(mask[rows, cols].astype(np.uint8) * 255)


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class _LimitReached(Exception):
    pass


class OpenAIJudge:
    """An OpenAI-compatible chat-completions judge (OpenAI, Azure OpenAI, vLLM, ...).

    The API key comes from `api_key`, else the file `api_key_file`, else the environment variable `api_key_env`
    (default AZURE_OPENAI_KEY with `azure_endpoint`, else OPENAI_API_KEY); without one, construction raises.
    `with_images` sends the focal crops of image and mask (ParaDLC-Bench) instead of text only (DLC-Bench).
    Every response is cached in `cache_path` (JSON, keyed by a hash of model and messages), so a rerun costs
    no calls. At most `api_call_limit` questions are sent over the judge's lifetime; each is tried
    `max_retries` times with `backoff * 2**attempt` s pauses. `max_tokens_param="max_completion_tokens"` and
    `temperature=None` suit GPT-5-class models, which reject `max_tokens` and temperature 0.
    """

    def __init__(
        self, model: str, *, base_url: str | None = None, azure_endpoint: str | None = None,
        api_version: str = "2024-10-21", api_key: str | None = None, api_key_file: str | Path | None = None,
        api_key_env: str | None = None, with_images: bool = False, concurrency: int = 10, max_retries: int = 5,
        backoff: float = 1.0, timeout: float = 120.0, api_call_limit: int = 5000, cache_path: str | Path | None = None,
        max_tokens: int = 300, max_tokens_param: str = "max_tokens", temperature: float | None = 0.0,
        top_p: float | None = 1.0, prompt_template: str | None = None, save_every: int = 20,
    ) -> None:
        env = api_key_env or ("AZURE_OPENAI_KEY" if azure_endpoint else "OPENAI_API_KEY")
        if api_key is None and api_key_file is not None:
            key_path = Path(api_key_file)
            if not key_path.is_file():
                raise PerceptionDLMError(f"API key file not found: {key_path}")
            api_key = key_path.read_text().strip()
        api_key = api_key or os.environ.get(env)
        if not api_key:
            raise PerceptionDLMError(f"No API key for the judge: set the environment variable {env} or pass a key "
                                     "file (--api-key-file); a local vLLM server takes the key given to its --api-key")
        import openai

        if azure_endpoint:
            self.client = openai.AzureOpenAI(azure_endpoint=azure_endpoint, api_key=api_key, api_version=api_version,
                                             timeout=timeout, max_retries=0)
        else:
            self.client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)
        self._openai = openai
        self.model, self.with_images = model, with_images
        self.concurrency, self.max_retries, self.backoff = max(1, concurrency), max(1, max_retries), backoff
        self.api_call_limit, self.save_every = api_call_limit, max(1, save_every)
        self.params: dict[str, Any] = {max_tokens_param: max_tokens}
        if temperature is not None:
            self.params["temperature"] = temperature
        if top_p is not None:
            self.params["top_p"] = top_p
        self.prompt_template = prompt_template or (IMAGE_PROMPT if with_images else TEXT_PROMPT)
        self.cache_path = None if cache_path is None else Path(cache_path)
        self.cache: dict[str, dict[str, Any]] = {}
        if self.cache_path is not None and self.cache_path.is_file():
            self.cache = read_json(self.cache_path, "Judge cache")
        self.calls = 0
        self._lock = threading.Lock()

    def check_ready(self) -> None:
        """Construction already verified the key; kept for a uniform judge interface."""

    def recognition_question(self, class_name: str) -> str:
        return recognition_question(class_name, self.with_images)

    def messages(self, query: JudgeQuery) -> list[dict[str, Any]]:
        prompt = self.prompt_template.format(caption=query.caption,
                                             question=format_question(query.question, query.choices))
        if not self.with_images:
            return [{"role": "user", "content": prompt}]
        if query.images is None:
            raise PerceptionDLMError(f"region {query.key}: this judge needs the image crops")
        image, mask = query.images
        return [{"role": "user", "content": [
            {"type": "text", "text": "The image:\n"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            {"type": "text", "text": "\nThe mask of the image:\n"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{mask}"}},
            {"type": "text", "text": f"\n{prompt}\n"},
        ]}]

    def _cache_key(self, messages: list[dict[str, Any]]) -> str:
        blob = json.dumps({"model": self.model, "params": self.params, "messages": messages}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _ask(self, messages: list[dict[str, Any]]) -> str:
        with self._lock:
            if self.calls >= self.api_call_limit:
                raise _LimitReached
            self.calls += 1
        errors = self._openai
        for attempt in range(self.max_retries):
            try:
                response = self.client.chat.completions.create(model=self.model, messages=messages, **self.params)
                return response.choices[0].message.content or ""
            except (errors.AuthenticationError, errors.PermissionDeniedError, errors.NotFoundError,
                    errors.BadRequestError) as err:
                raise PerceptionDLMError(f"The judge API refused the request ({err}); check the key, model and "
                                         "parameters") from err
            except errors.OpenAIError as err:
                if attempt == self.max_retries - 1:
                    raise PerceptionDLMError(f"The judge API failed {self.max_retries} times: {err}") from err
                logger.warning("judge call failed (attempt %d/%d): %s; retrying", attempt + 1, self.max_retries, err)
                time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _save_cache(self) -> None:
        if self.cache_path is not None:
            with self._lock:
                snapshot = dict(self.cache)
            write_json_atomic(self.cache_path, snapshot)

    def answer_all(self, queries: Sequence[JudgeQuery], progress: bool = True) -> list[Verdict]:
        """Asks every query (cached ones from the cache); raises after saving the cache if the call limit
        stopped some questions or a call kept failing (a rerun continues from the cache)."""
        keys = [self._cache_key(self.messages(q)) for q in queries]
        todo = list({k: i for i, k in reversed(list(enumerate(keys))) if k not in self.cache}.values())
        unanswered, failures = 0, []
        with ThreadPoolExecutor(self.concurrency) as pool, tqdm(total=len(todo), disable=not progress,
                                                                desc="judge", unit="q") as bar:
            futures = {pool.submit(self._ask, self.messages(queries[i])): i for i in todo}
            try:
                for done, future in enumerate(as_completed(futures), 1):
                    i = futures[future]
                    try:
                        response = future.result()
                    except _LimitReached:
                        unanswered += 1
                        continue
                    except PerceptionDLMError as err:
                        failures.append(err)
                        continue
                    finally:
                        bar.update(1)
                    with self._lock:
                        self.cache[keys[i]] = {"key": queries[i].key, "index": queries[i].index, "response": response}
                    if done % self.save_every == 0:
                        self._save_cache()
            except BaseException:  # e.g. Ctrl-C: send nothing more, keep what was answered
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            finally:
                self._save_cache()
        if failures:
            raise failures[0]
        if unanswered:
            raise PerceptionDLMError(f"API-call limit {self.api_call_limit} reached: {unanswered} of {len(queries)} "
                                     "questions unanswered; the answers so far are cached, rerun with a higher "
                                     "--api-call-limit")
        verdicts = []
        for query, key in zip(queries, keys, strict=True):
            response = self.cache[key]["response"]
            verdicts.append(Verdict(response, parse_answer(response, query.choices)))
        return verdicts


def keyword_answer(caption: str, question: str, choices: Sequence[str], record: Mapping[str, Any]) -> int | None:
    """Default rule: recognition is "Yes" iff a word of the class name (length >= 3, a trailing "s" dropped)
    occurs in the caption; otherwise pick the choice with the largest share of its words (length >= 3) found
    in the caption (ties: more words, then the earlier choice); None when no choice shares a word."""
    words = set(re.findall(r"[a-z0-9]+", caption.lower()))
    stems = {w.rstrip("s") for w in words}
    if record.get("kind") == "recognition":
        names = [w.rstrip("s") for w in re.findall(r"[a-z0-9]+", str(record.get("class_name", "")).lower())
                 if len(w) >= 3]
        return 0 if any(n in stems for n in names) else 1
    best, best_rank = None, (0.0, 0)
    for i, choice in enumerate(choices):
        terms = [w for w in re.findall(r"[a-z0-9]+", choice.lower()) if len(w) >= 3]
        if not terms:
            continue
        rank = (sum(t in words or t.rstrip("s") in stems for t in terms) / len(terms), len(terms))
        if rank[0] > 0 and rank > best_rank:
            best, best_rank = i, rank
    return best


AnswerFn = Callable[[str, str, Sequence[str], Mapping[str, Any]], int | None]


class RuleJudge:
    """A deterministic judge: `answer_fn(caption, question, choices, record) -> choice index | None`, where
    record = {"key", "index", "kind", "class_name"}. Default: `keyword_answer`."""

    with_images = False

    def __init__(self, answer_fn: AnswerFn = keyword_answer) -> None:
        self.answer_fn = answer_fn

    def check_ready(self) -> None:
        """Nothing to check: the rule judge needs no service."""

    def recognition_question(self, class_name: str) -> str:
        return recognition_question(class_name, with_image=False)

    def answer_all(self, queries: Sequence[JudgeQuery], progress: bool = True) -> list[Verdict]:
        verdicts = []
        for q in tqdm(queries, disable=not progress, desc="judge", unit="q"):
            record = {"key": q.key, "index": q.index, "kind": q.kind, "class_name": q.class_name}
            choice = self.answer_fn(q.caption, q.question, q.choices, record)
            valid = isinstance(choice, int) and 0 <= choice < len(q.choices)
            verdicts.append(Verdict(LETTERS[choice].upper() if valid else None, choice if valid else None))
        return verdicts


def _as_data(value: Any, what: str) -> Any:
    return read_json(Path(value), what) if isinstance(value, (str, Path)) else value


def _region_crops(records: list[ImageRecord], keys: Sequence[str], image_root: Path) -> dict[str, tuple[str, str]]:
    regions = {region.key: (record, region) for record in records for region in record.regions}
    absent = [k for k in keys if k not in regions]
    if absent:
        raise PerceptionDLMError(f"{len(absent)} judged regions are not in the annotations (e.g. {absent[:5]})")
    needed = {regions[k][0].file_name for k in keys}
    missing = sorted(str(image_root / Path(n).name) for n in needed if not (image_root / Path(n).name).is_file())
    if missing:
        raise PerceptionDLMError(f"{len(missing)} images for the judge's crops are missing (e.g. {missing[:3]}); "
                                 "check --image-root")
    crops: dict[str, tuple[str, str]] = {}
    loaded: dict[str, np.ndarray] = {}
    for key in keys:
        record, region = regions[key]
        if record.file_name not in loaded:
            with Image.open(image_root / Path(record.file_name).name) as img:
                loaded[record.file_name] = np.asarray(img.convert("RGB"))
        image, mask = loaded[record.file_name], mask_array(region)
        if image.shape[:2] != mask.shape:
            raise PerceptionDLMError(f"region {key}: mask {mask.shape} differs from image {image.shape[:2]}")
        crop_image, crop_mask = focal_crops(image, mask)
        crops[key] = (_png_base64(crop_image), _png_base64(crop_mask))
    return crops


def judge_and_score(
    judge: OpenAIJudge | RuleJudge, predictions: Mapping[str, str] | str | Path,
    qa: Mapping[str, list[dict[str, Any]]] | str | Path, class_names: Mapping[str, str] | str | Path, *,
    annotations: list[ImageRecord] | str | Path | None = None, image_root: str | Path | None = None,
    default_prediction: str | None = None, output_path: str | Path | None = None, progress: bool = True,
    title: str = "Region captioning benchmark",
) -> dict[str, Any]:
    """Asks the judge the recognition question and every qa question of each region, scores the answers with the
    published protocol and (with `output_path`) writes the report, answers included, as JSON + Markdown.
    Inputs are checked before any judge call: predictions (or `default_prediction`) and class names for every
    qa key, and for an image judge the annotations and image files."""
    judge.check_ready()
    predictions = _as_data(predictions, "Prediction file")
    qa = _as_data(qa, "QA file")
    class_names = _as_data(class_names, "Class-names file")
    keys = [str(k) for k in qa]
    no_pred = [k for k in keys if k not in predictions]
    if no_pred and default_prediction is None:
        raise PerceptionDLMError(f"{len(no_pred)} regions have no prediction (e.g. {no_pred[:5]}); caption them "
                                 "first or pass a default prediction")
    no_class = [k for k in keys if k not in class_names]
    if no_class:
        raise PerceptionDLMError(f"{len(no_class)} regions have no class name (e.g. {no_class[:5]})")
    crops: dict[str, tuple[str, str]] = {}
    if judge.with_images:
        if annotations is None or image_root is None:
            raise PerceptionDLMError("an image judge needs the annotations (masks) and the image root")
        records = load_annotations(annotations) if isinstance(annotations, (str, Path)) else annotations
        crops = _region_crops(records, keys, Path(image_root))
    queries = []
    for key in keys:
        caption = predictions.get(key, default_prediction)
        name = str(class_names[key])
        queries.append(JudgeQuery(key, 0, "recognition", caption, judge.recognition_question(name),
                                  list(RECOGNITION_CHOICES), name, crops.get(key)))
        for i, q in enumerate(qa[key], 1):
            queries.append(JudgeQuery(key, i, q.get("type", "?"), caption, q["question"], [c[0] for c in q["choices"]],
                                      name, crops.get(key)))
    verdicts = judge.answer_all(queries, progress=progress)
    answers: dict[str, dict[str, Any]] = {k: {"recognition": None, "answers": []} for k in keys}
    details: dict[str, dict[str, Any]] = {k: {"pred": predictions.get(k, default_prediction),
                                              "class_name": class_names[k], "responses": []} for k in keys}
    for query, verdict in zip(queries, verdicts, strict=True):
        if query.index == 0:
            answers[query.key]["recognition"] = verdict.choice
        else:
            answers[query.key]["answers"].append(verdict.choice)
        details[query.key]["responses"].append({"response": verdict.response, "choice": verdict.choice})
    report = score_benchmark(qa, answers, class_names)
    report["missing_predictions"] = no_pred
    if output_path is not None:
        output_path = Path(output_path)
        write_report({**report, "judgements": details}, output_path, output_path.with_suffix(".md"), title)
    return report
