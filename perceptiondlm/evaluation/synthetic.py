"""The synthetic bench: the tiny world's benchmark split (ParaDLC-Bench file formats) run end to end: caption
every region with the model, answer every question with the tiny world's exact rule judge, score with the
published protocol, and report per-attribute accuracy. Deterministic, no API: CI runs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from perceptiondlm.data.synthetic import ATTRIBUTES, parse_caption, rule_answer
from perceptiondlm.evaluation.judges import RuleJudge, judge_and_score
from perceptiondlm.evaluation.regionbench import run_benchmark
from perceptiondlm.io import read_json, write_json_atomic


def tiny_world_judge(qa: Mapping[str, Sequence[Mapping[str, Any]]]) -> RuleJudge:
    """A `RuleJudge` that answers as a perfect reader of the caption: the recognition question by comparing the
    caption's shape with the class name, every other question with `synthetic.rule_answer`."""

    def answer(caption: str, question: str, choices: Sequence[str], record: Mapping[str, Any]) -> int:
        if record["kind"] == "recognition":
            return 0 if parse_caption(caption)["shape"] == record["class_name"] else 1  # 0 = "Yes"
        return rule_answer(caption, dict(qa[record["key"]][record["index"] - 1]))

    return RuleJudge(answer)


def attribute_accuracy(captions: Mapping[str, str], attributes: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Share of regions whose caption names exactly the true value of each attribute."""
    parsed = {key: parse_caption(captions.get(key, "")) for key in attributes}
    return {a: sum(parsed[k][a] == truth[a] for k, truth in attributes.items()) / max(len(attributes), 1)
            for a in ATTRIBUTES}


def attribute_accuracy_by_cover(captions: Mapping[str, str], attributes: Mapping[str, Mapping[str, Any]]
                                ) -> dict[str, dict[str, float]]:
    """`attribute_accuracy` of the partly covered regions and of the others, each with its number of regions: an
    occluder shares patches with the object it covers, and that is where the tiny model's colour errors are."""
    groups: dict[str, dict[str, Mapping[str, Any]]] = {"partly_covered": {}, "unoccluded": {}}
    for key, truth in attributes.items():
        groups["partly_covered" if truth.get("partly_covered") else "unoccluded"][key] = truth
    return {name: {"regions": len(group), **attribute_accuracy(captions, group)} for name, group in groups.items()}


def run_synthetic_bench(model: Any, bench_dir: str | Path, output_dir: str | Path, *, gen_length: int = 16,
                        steps: int = 16, decoding: str = "reference", sequential: bool = False, progress: bool = True,
                        **caption_kwargs: Any) -> dict[str, Any]:
    """Captions, judges and scores the benchmark in `bench_dir` (images/, annotations.json, qa.json,
    class_names.json, attributes.json); `model` is a PerceptionDLM or a checkpoint directory. Writes
    captions.json, its summary, scores.json/.md and report.json under `output_dir`; returns the report:
    {"avg", "avg_pos", "avg_neg" (×100), "attribute_accuracy" (and `_by_cover`), "tpf", "generation_seconds", ...}."""
    from perceptiondlm.models.perceptiondlm import PerceptionDLM

    bench, output = Path(bench_dir), Path(output_dir)
    if not isinstance(model, PerceptionDLM):
        model = PerceptionDLM.from_pretrained(model).eval()
    captions_path = output / ("captions_sequential.json" if sequential else f"captions_{decoding}.json")
    summary = run_benchmark(model, bench / "annotations.json", bench / "images", captions_path,
                            gen_length=gen_length, steps=steps, decoding=decoding, sequential=sequential,
                            progress=progress, **caption_kwargs)
    qa = read_json(bench / "qa.json", "QA file")
    scores = judge_and_score(tiny_world_judge(qa), captions_path, qa, bench / "class_names.json",
                             output_path=captions_path.with_name(captions_path.stem + "_scores.json"),
                             progress=progress, title="Synthetic bench")
    captions = read_json(captions_path, "Caption file")
    attributes = read_json(bench / "attributes.json", "Attribute file")
    report = {
        "decoding": decoding, "sequential": sequential, "gen_length": gen_length, "steps": steps,
        **{k: scores[k] for k in ("avg", "avg_pos", "avg_neg") if k in scores},
        "attribute_accuracy": attribute_accuracy(captions, attributes),
        "attribute_accuracy_by_cover": attribute_accuracy_by_cover(captions, attributes),
        **{k: summary[k] for k in ("tpf", "generation_seconds", "nfe", "tokens", "regions_per_second") if k in summary},
        "regions": len(captions),
    }
    write_json_atomic(captions_path.with_name(captions_path.stem + "_report.json"), report)
    return report


def run_base_qa(model: Any, n_images: int = 100, seed: int = 13, questions_per_image: int = 3,
                output_path: str | Path | None = None, gen_length: int = 4) -> dict[str, Any]:
    """Held-out attribute questions ("What colour is the plain object in the top right?") about the benchmark
    split's scenes (`seed` = its seed), answered by a Base (or region) model's `chat`; exact-match accuracy,
    overall and per attribute asked. Writes every question, answer and prediction to `output_path` if given."""
    import numpy as np
    from PIL import Image

    from perceptiondlm.data.synthetic import attribute_questions, make_scene
    from perceptiondlm.models.perceptiondlm import PerceptionDLM

    if not isinstance(model, PerceptionDLM):
        model = PerceptionDLM.from_pretrained(model).eval()
    records = []
    for i in range(n_images):
        scene = make_scene(seed, i)
        image = Image.fromarray(scene.image)
        for question, answer, asked in attribute_questions(scene, np.random.default_rng([seed, i, 3]),
                                                           questions_per_image):
            predicted = model.chat(image, question, gen_length=gen_length).text.strip().rstrip(".")
            records.append({"image": i, "question": question, "answer": answer, "attribute": asked,
                            "prediction": predicted, "correct": predicted.lower() == answer.lower()})
    by_attribute: dict[str, list[bool]] = {}
    for record in records:
        by_attribute.setdefault(record["attribute"], []).append(record["correct"])
    report = {"accuracy": sum(r["correct"] for r in records) / max(len(records), 1), "questions": len(records),
              "attribute_accuracy": {a: sum(v) / len(v) for a, v in sorted(by_attribute.items())}}
    if output_path is not None:
        write_json_atomic(Path(output_path), {**report, "records": records})
    return report
