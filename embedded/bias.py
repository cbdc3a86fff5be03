"""The control's bias: why continued SFT on the pairs' chosen traces is not a neutral reference.

A pair exists only for a problem the teacher got wrong at least once, and the teacher is wrong mostly where
it answers at a glance (the direct way), in the stories where it does so most; so the pairs' chosen traces
(the first correct trace of those problems) are not a sample of the positives. Per story s, pooled over the
task draws:

    direct share      how often a trace answers at a glance: among the positives (sft.jsonl, the SFT data)
                      and among the pairs' chosen traces (pairs.jsonl, the control's data)
    habit failure     Σ_w share_w · f_sw, f_sw the teacher's failure rate of way w in story s (stats.json):
                      how often the way mix each side teaches fails when the teacher takes it
    picked, accuracy  on the test problems of the story, how often the SFT model and the control answer at a
                      glance, and how often they are right (pooled over their cells)
"""

from __future__ import annotations

import json
from collections import Counter

from data import synthetic


def _direct_share(pairs: list[tuple[str, str]]) -> dict[int, Counter]:
    """{story: Counter(way)} of (problem text, trace) pairs."""
    counts: dict[int, Counter] = {s: Counter() for s in range(len(synthetic.STORIES))}
    for problem, trace in pairs:
        counts[synthetic.story_of(problem)][synthetic.trace_way(trace)] += 1
    return counts


def _rows(path) -> list[dict]:  # noqa: ANN001 (a Path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def teacher_failure(tasks: list[dict]) -> dict[int, dict[str, float]]:
    """{story: {way: the teacher's failure rate}} pooled over the tasks' stats.json."""
    fails: dict[int, Counter] = {s: Counter() for s in range(len(synthetic.STORIES))}
    counts: dict[int, Counter] = {s: Counter() for s in range(len(synthetic.STORIES))}
    for task in tasks:
        stats = json.loads(task["stats"].read_text())["teacher"]["ways_per_story"]
        for s, ways in stats.items():
            for way in synthetic.WAYS:
                counts[int(s)][way] += ways[way]["count"]
                fails[int(s)][way] += ways[way]["count"] * (ways[way]["failure_rate"] or 0.0)
    return {s: {w: fails[s][w] / counts[s][w] if counts[s][w] else 0.0 for w in synthetic.WAYS}
            for s in counts}


def model_ways(cells: dict | None) -> dict[int, dict[str, float]] | None:
    """{story: {"direct_picked", "accuracy"}} of a model's graded cells (grading.grade's per-problem
    "way", "story" and "correct"), pooled over the cells."""
    if not cells:
        return None
    picked, right, total = Counter(), Counter(), Counter()
    for graded in cells.values():
        for way, story, correct in zip(graded["way"], graded["story"], graded["correct"], strict=True):
            total[story] += 1
            picked[story] += way == "direct"
            right[story] += correct == 1.0
    return {s: {"direct_picked": picked[s] / total[s], "accuracy": right[s] / total[s]}
            for s in sorted(total)}


def control_bias(tasks: list[dict], sft: dict, control: dict | None) -> dict:
    """The module docstring's measures → {"stories": {story: {...}}, "overall": {...}}."""
    positives = _direct_share([(r["messages"][0]["content"], r["messages"][1]["content"])
                               for task in tasks for r in _rows(task["sft"])])
    chosen = _direct_share([(r["prompt"], r["chosen"]) for task in tasks for r in _rows(task["pairs"])])
    failure = teacher_failure(tasks)
    models = {"sft": model_ways(sft), "control": model_ways(control)}
    stories, overall = {}, {"positives": Counter(), "chosen": Counter()}
    for s in positives:
        row = {"story": synthetic.STORIES[s]["name"], "teacher_failure": failure[s]}
        for side, counts in (("positives", positives[s]), ("chosen", chosen[s])):
            n = sum(counts.values())
            share = {w: counts[w] / n if n else 0.0 for w in synthetic.WAYS}
            row[side] = {"traces": n, "direct_share": share["direct"],
                         "habit_failure": sum(share[w] * failure[s][w] for w in synthetic.WAYS)}
            overall[side] += counts
        for name, ways in models.items():
            if ways is not None and s in ways:
                row[name] = ways[s]
        stories[s] = row
    shares = {side: overall[side]["direct"] / max(1, sum(overall[side].values())) for side in overall}
    return {"stories": stories, "overall": {"positives_direct_share": shares["positives"],
                                            "chosen_direct_share": shares["chosen"]}}
