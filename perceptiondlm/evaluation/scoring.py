"""The published DLC-Bench / ParaDLC-Bench scoring protocol (NVlabs DAM scorer, spec §4.1): recognition gate,
per-region means of positive and negative scores, Avg = (avg_pos + avg_neg) / 2, reported x100.
Pure functions of (questions, judge answers), plus an atomic JSON + Markdown report writer."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.io import write_json_atomic

__all__ = ["RECOGNITION_CHOICES", "PROTOCOL_NOTE", "question_score", "score_region", "score_benchmark",
           "format_markdown", "write_report"]

#: The recognition question prepended to every region: choice 0 ("Yes") passes the gate, 1 ("No") fails it.
RECOGNITION_CHOICES = ("Yes", "No")
PROTOCOL_NOTE = (
    "Scores are percentages (x100). A region whose recognition answer is not 'Yes' (a 'No' or an unparseable "
    "answer) has every question score clamped to <= 0. Region pos = mean of its positive-question scores, "
    "region neg = mean of its negative-question scores. avg_pos = mean over ALL regions, a region without "
    "positive questions counting 0 (the published scorer's default; avg_pos_excluding_no_positive leaves them "
    "out); avg_neg = mean over regions with negative questions; Avg = (avg_pos + avg_neg) / 2. An unparseable "
    "answer scores 0 and is counted in n_unparsed."
)


def question_score(question: Mapping[str, Any], choice: int | None) -> float | None:
    """The score of the chosen option; None when the answer was unparseable (or names no existing option)."""
    choices = question["choices"]
    if choice is None or not 0 <= choice < len(choices):
        return None
    return float(choices[choice][1])


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_region(questions: Sequence[Mapping[str, Any]], recognition: int | None,
                 answers: Sequence[int | None], key: str = "?") -> dict[str, Any]:
    """One region: {"recognized", "pos" (None if no positive question), "neg" (None if no negative), "scores",
    "n_unparsed", "recognition_unparsed"}. `answers[i]` is the chosen option of `questions[i]` or None."""
    if len(answers) != len(questions):
        raise PerceptionDLMError(f"region {key}: {len(answers)} answers for {len(questions)} questions")
    recognized = recognition == 0
    pos: list[float] = []
    neg: list[float] = []
    scores: list[float] = []
    unparsed = 0
    for i, (question, choice) in enumerate(zip(questions, answers, strict=True)):
        value = question_score(question, choice)
        if value is None:
            unparsed, value = unparsed + 1, 0.0
        if not recognized:
            value = min(0.0, value)
        kind = question.get("type")
        if kind == "positive":
            pos.append(value)
        elif kind == "negative":
            neg.append(value)
        else:
            raise PerceptionDLMError(f"region {key}, question {i}: type {kind!r} is neither 'positive' nor 'negative'")
        scores.append(value)
    return {"recognized": recognized, "recognition_unparsed": recognition not in (0, 1), "pos": _mean(pos),
            "neg": _mean(neg), "scores": scores, "n_unparsed": unparsed}


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _aggregate(regions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """avg_pos (no-positive regions count 0), its variant without them, avg_neg, Avg; all x100."""
    avg_pos = _mean([r["pos"] if r["pos"] is not None else 0.0 for r in regions])
    avg_pos_ex = _mean([r["pos"] for r in regions if r["pos"] is not None])
    avg_neg = _mean([r["neg"] for r in regions if r["neg"] is not None])

    def both(p: float | None, n: float | None) -> float | None:
        return None if p is None or n is None else (p + n) / 2

    return {"n_regions": len(regions), "avg_pos": _percent(avg_pos), "avg_neg": _percent(avg_neg),
            "avg": _percent(both(avg_pos, avg_neg)), "avg_pos_excluding_no_positive": _percent(avg_pos_ex),
            "avg_excluding_no_positive": _percent(both(avg_pos_ex, avg_neg))}


def score_benchmark(qa: Mapping[str, Sequence[Mapping[str, Any]]], answers: Mapping[str, Mapping[str, Any]],
                    categories: Mapping[str, str] | None = None, *, missing: str = "error") -> dict[str, Any]:
    """Scores every region of `qa` from `answers[key] = {"recognition": int | None, "answers": [int | None]}`.

    `categories` (key -> class name, e.g. class_names.json) gives the per-category breakdown (lower-cased).
    A qa key without answers raises (`missing="error"`) or is left out and listed (`missing="skip"`).
    """
    if missing not in ("error", "skip"):
        raise PerceptionDLMError(f"missing must be 'error' or 'skip', got {missing!r}")
    absent = [key for key in qa if key not in answers]
    if absent and missing == "error":
        raise PerceptionDLMError(f"{len(absent)} regions have no judge answers (e.g. {absent[:5]}); judge them "
                                 "first or pass missing='skip'")
    regions: dict[str, dict[str, Any]] = {}
    for key, questions in qa.items():
        if key in answers:
            entry = answers[key]
            region = score_region(questions, entry.get("recognition"), entry.get("answers", []), key)
            region["category"] = str((categories or {}).get(key, "unknown")).lower()
            regions[key] = region
    by_category: dict[str, list[dict[str, Any]]] = {}
    for region in regions.values():
        by_category.setdefault(region["category"], []).append(region)
    values = list(regions.values())
    return {
        **_aggregate(values),
        "n_questions": sum(len(r["scores"]) for r in values),
        "n_unparsed": sum(r["n_unparsed"] for r in values),
        "n_recognition_failed": sum(not r["recognized"] for r in values),
        "n_recognition_unparsed": sum(r["recognition_unparsed"] for r in values),
        "n_no_positive": sum(r["pos"] is None for r in values),
        "n_no_negative": sum(r["neg"] is None for r in values),
        "missing": absent,
        "protocol": PROTOCOL_NOTE,
        "categories": {name: _aggregate(group) for name, group in sorted(by_category.items())},
        "regions": regions,
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_markdown(report: Mapping[str, Any], title: str = "Region captioning benchmark") -> str:
    """A Markdown summary: headline Pos / Neg / Avg, the variant, counts and the per-category table."""
    lines = [
        f"# {title}", "",
        "| | Pos | Neg | Avg |", "|---|---:|---:|---:|",
        f"| published protocol | {_fmt(report['avg_pos'])} | {_fmt(report['avg_neg'])} | {_fmt(report['avg'])} |",
        f"| excluding regions without positives | {_fmt(report['avg_pos_excluding_no_positive'])} | "
        f"{_fmt(report['avg_neg'])} | {_fmt(report['avg_excluding_no_positive'])} |",
        "",
        f"Regions: {report['n_regions']} ({report['n_no_positive']} without positive questions), questions: "
        f"{report['n_questions']}, unparseable answers: {report['n_unparsed']}, recognition failed: "
        f"{report['n_recognition_failed']} (of which unparseable: {report['n_recognition_unparsed']}), "
        f"regions without answers: {len(report['missing'])}.",
        "", report["protocol"], "",
        "| category | regions | Pos | Neg | Avg |", "|---|---:|---:|---:|---:|",
    ]
    for name, row in report["categories"].items():
        lines.append(f"| {name} | {row['n_regions']} | {_fmt(row['avg_pos'])} | {_fmt(row['avg_neg'])} | "
                     f"{_fmt(row['avg'])} |")
    return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], json_path: str | Path, markdown_path: str | Path | None = None,
                 title: str = "Region captioning benchmark") -> None:
    """Writes the report as JSON and (optionally) Markdown, both atomically."""
    write_json_atomic(Path(json_path), report)
    if markdown_path is not None:
        path = Path(markdown_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "w") as out:
                out.write(format_markdown(report, title))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
