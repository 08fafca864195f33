"""The benchmark's outputs from lm-eval's results: metrics.json, compare.md and results/<model>.json.

Differences between models are paired: every model answers the same items, so the standard error of
a difference is that of the per-item differences, std(a_i - b_i) / sqrt(n), which is smaller than
combining two independent errors when the models agree on many items.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

MAIN_METRICS = ("acc", "acc_norm")


def task_scores(results: dict) -> dict[str, dict]:
    """{task: {metric: value, metric_stderr: value, n}} from one lm-eval result ("acc,none" -> "acc")."""
    out = {}
    for task, row in results["results"].items():
        if task not in results.get("n-samples", {}):  # a group's aggregate line
            continue
        scores: dict = {}
        for key, value in row.items():
            metric, sep, filt = key.partition(",")
            if sep and isinstance(value, (int, float)) and not isinstance(value, bool):
                scores[metric if filt == "none" else f"{metric}_{filt}"] = float(value)
        scores["n"] = int(results["n-samples"][task]["effective"])
        out[task] = scores
    return out


def paired_difference(a: dict, b: dict, task: str, metric: str) -> tuple[float, float, int] | None:
    """(mean of a_i - b_i, its standard error, n) over the items both models answered; None if unscored."""
    left = {s["doc_id"]: float(s[metric]) for s in a["samples"].get(task, []) if metric in s}
    right = {s["doc_id"]: float(s[metric]) for s in b["samples"].get(task, []) if metric in s}
    ids = sorted(set(left) & set(right))
    if not ids:
        return None
    d = [left[i] - right[i] for i in ids]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1) if len(d) > 1 else float("nan")
    return mean, math.sqrt(var / len(d)), len(d)


def metrics_of(raw: dict[str, dict]) -> dict:
    """{model: {task: scores}} and, for every later model, {first}_minus_{other}: {task: paired differences}."""
    metrics: dict = {name: task_scores(res) for name, res in raw.items()}
    names = list(raw)
    for other in names[1:]:
        diffs: dict = {}
        for task in metrics[names[0]]:
            row: dict = {}
            for metric in MAIN_METRICS:
                found = paired_difference(raw[names[0]], raw[other], task, metric)
                if found is not None:
                    row[metric], row[f"{metric}_stderr"], n = found
            if row:
                diffs[task] = {**row, "n": n}
        metrics[f"{names[0]}_minus_{other}"] = diffs
    return metrics


def chance(results: dict, task: str) -> float | None:
    """Expected accuracy of guessing: the mean of 1 / (number of choices) over the task's items."""
    samples = [s for s in results["samples"].get(task, []) if s.get("arguments")]
    return sum(1.0 / len(s["arguments"]) for s in samples) / len(samples) if samples else None


def _training_flops(model_dir: Path) -> float | None:
    """From the metrics.json `moe-lab pretrain` writes beside its model/ folder, when there is one."""
    path = Path(model_dir).parent / "metrics.json"
    try:
        saved = json.loads(path.read_text())
        value = (saved.get("cost") or {}).get("train_flops", saved.get("train_flops"))
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def _pm(value: float | None, err: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    return text + (f" ± {err:.3f}" if err is not None and math.isfinite(err) else "")


def compare_markdown(raw: dict[str, dict], metrics: dict, model_dirs: dict[str, Path]) -> str:
    names = list(raw)
    first = names[0]
    diff_cols = [f"{first} − {o} (paired)" for o in names[1:]]
    header = ["", "n", "chance", *names, *diff_cols]
    rows = []

    def add(label: str, n: str, chance_: str, cells: list[str], diffs: list[str]) -> None:
        rows.append([label, n, chance_, *cells, *(diffs or [""] * len(diff_cols))])

    add("params total", "", "", [f"{raw[m]['moe_lab']['params']['total']:,}" for m in names], [])
    add("params active / token", "", "", [f"{raw[m]['moe_lab']['params']['active']:,}" for m in names], [])
    flops = [_training_flops(model_dirs[m]) for m in names]
    if any(f is not None for f in flops):
        add("training FLOPs", "", "", [f"{f:.3e}" if f is not None else "-" for f in flops], [])
    for task in metrics[first]:
        scores = metrics[first][task]
        shown = [m for m in scores if m not in ("n",) and not m.endswith("_stderr")]
        c = chance(raw[first], task)
        for metric in shown:
            cells = [_pm(metrics[m].get(task, {}).get(metric), metrics[m].get(task, {}).get(f"{metric}_stderr")) for m in names]
            diffs = []
            for o in names[1:]:
                d = metrics[f"{first}_minus_{o}"].get(task, {})
                diffs.append(_pm(d.get(metric), d.get(f"{metric}_stderr"), signed=True))
            add(f"{task} {metric}", str(scores["n"]), f"{c:.3f}" if c is not None else "-", cells, diffs)
    add("seconds (load + evaluate)", "", "", [f"{raw[m]['moe_lab']['seconds']:.1f}" for m in names], [])
    device = raw[first]["moe_lab"]["device"]
    lines = [
        "# Benchmark: lm-eval multiple choice, accuracy ± standard error",
        "",
        f"lm-eval {_version()}, {device}, {raw[first]['moe_lab']['dtype']}, "
        f"{raw[first]['moe_lab']['num_fewshot']}-shot. acc: the choice with the highest "
        "log-likelihood; acc_norm: highest log-likelihood per character. Models: "
        + "; ".join(f"{m} = {model_dirs[m]}" for m in names) + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    return "\n".join(lines) + "\n"


def _version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def write_results(folder: Path, raw: dict[str, dict], samples: bool) -> None:
    """lm-eval's own results per model (without per-item samples unless ``samples``)."""
    from lm_eval.utils import handle_non_serializable

    folder.mkdir(parents=True, exist_ok=True)
    for name, res in raw.items():
        kept = {k: v for k, v in res.items() if k != "samples"}
        (folder / f"{name}.json").write_text(json.dumps(kept, indent=2, default=handle_non_serializable) + "\n")
        if samples:
            with open(folder / f"{name}.samples.jsonl", "w", encoding="utf-8") as f:
                for task, items in res["samples"].items():
                    for s in items:
                        f.write(json.dumps({"task": task, **s}, default=handle_non_serializable, ensure_ascii=False) + "\n")
