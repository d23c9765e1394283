"""Turn harness results into JSON, a Markdown report and PNG plots (all written atomically)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from statistics import mean

from peft_sparse.files import atomic_write_text, default_mode


def _mean(scores: dict[str, float], tasks: list[str]) -> float | None:
    values = [scores[t] for t in tasks if t in scores]
    return mean(values) if values else None


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _sampling_error(test_items: dict[str, int], held_in: list[str]) -> list[str]:
    """One line on how far test-set sampling alone moves the scores (binomial SE at 50 %, the worst case)."""
    sizes = [test_items[t] for t in held_in if test_items.get(t)]
    if not sizes:
        return []
    per_task = 50 / min(sizes) ** 0.5
    per_mean = 50 * sum(1 / n for n in sizes) ** 0.5 / len(sizes)
    return [
        f"Each held-in score rests on {min(sizes)}–{max(sizes)} test items: one standard error is at most"
        f" {per_task:.1f} pts for a task and {per_mean:.1f} pts for the held-in mean, so smaller gaps are noise."
    ]


def _per_task_table(title: str, rows, tasks: list[str]) -> list[str]:
    """A Markdown section: one row per model, one column per task."""
    lines = ["", f"## {title}", "", "| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    return lines + [f"| {label} | " + " | ".join(_pct(scores.get(t)) for t in tasks) + " |" for label, scores in rows]


def _fixed(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


BARS = {
    # (single-task margin over LoRA, merged margin over the best merged LoRA) per scorer: the issues' bars
    "encoder": (0.01, 0.03),
    "causal": (0.0, 0.02),
}


def claims(results: dict, held_in: list[str], scorer: str = "encoder") -> list[dict]:
    """The issue's bar, evaluated on these results (None where a method was not run)."""
    single_margin, merged_margin = BARS[scorer]
    ind = {m: _mean(s, held_in) for m, s in results["individual"].items()}
    sparse = {m: v for m, v in ind.items() if m.startswith("sparse") and v is not None}
    best_sparse = max(sparse, key=sparse.get) if sparse else None
    merged = {m: _mean(s, held_in) for m, s in results["merged"].items()}
    merged_sparse = {m: v for m, v in merged.items() if m.startswith("sparse")}
    merged_lora = {m: v for m, v in merged.items() if m.startswith("lora")}
    rows = []

    def add(claim: str, lhs: float | None, rhs: float | None, margin: float, detail: str) -> None:
        held = None if lhs is None or rhs is None else lhs >= rhs + margin
        rows.append({"claim": claim, "lhs": lhs, "rhs": rhs, "held": held, "detail": detail})

    add(
        "sparse (best init) ≥ LoRA" + (f" + {100 * single_margin:g} pt" if single_margin else ""),
        sparse.get(best_sparse),
        ind.get("lora"),
        single_margin,
        f"best init: {best_sparse}",
    )
    add("sparse (best init) ≥ SHiRA", sparse.get(best_sparse), ind.get("shira"), 0.0, f"best init: {best_sparse}")
    best_ms = max(merged_sparse, key=merged_sparse.get) if merged_sparse else None
    best_ml = max(merged_lora, key=merged_lora.get) if merged_lora else None
    add(
        f"merged sparse ≥ best merged LoRA + {100 * merged_margin:g} pts",
        merged_sparse.get(best_ms),
        merged_lora.get(best_ml),
        merged_margin,
        f"{best_ms} vs {best_ml}",
    )
    if best_ms:
        own = ind.get(best_ms.split(":")[0])
        add(
            "merged sparse ≥ 90 % of its experts",
            merged_sparse[best_ms],
            None if own is None else 0.9 * own,
            0.0,
            f"{best_ms}; experts' mean {_pct(own)}",
        )
    return rows


OVERHEAD_FILE = "routing_overhead.json"  # written by benchmarks/reuse/overhead.py (not rerun here)
OVERHEAD_EXPERTS, OVERHEAD_BAR = 16, 2.0
ARROW_MARGIN = 0.01  # Arrow over sparse experts vs the uniform sparse merge, held-out mean


def read_overhead(out_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The routing-overhead benchmark's results, from ``out_dir`` or the repository's benchmarks/results."""
    for folder in (Path(out_dir), Path(__file__).resolve().parents[1] / "results"):
        path = folder / OVERHEAD_FILE
        if path.exists():
            return path, json.loads(path.read_text())
    return None


def _is_arrow(label: str) -> bool:
    return ":arrow" in label


def reuse_rows(results: dict, held_in: list[str], held_out: list[str]) -> list[dict]:
    """One row per reuse strategy (with base, per-task experts and the uniform merges to compare against)."""
    rows = []

    def add(label: str, what: str, scores: dict) -> None:
        rows.append(
            {"label": label, "what": what, "held_in": _mean(scores, held_in), "held_out": _mean(scores, held_out)}
        )

    add("base", "zero-shot", results["individual"]["base"])
    methods = {label.split(":")[0] for label in results.get("reuse", {})}
    for method in [m for m in results["individual"] if m in methods]:
        add(f"{method} (per task)", "each task's own expert (held-in only)", results["individual"][method])
        for label, scores in results["merged"].items():
            if label.split(":")[0] == method and label.split(":")[1] in ("sparse_average", "linear"):
                add(label, "uniform merge of all experts", scores)
        for label, scores in results["reuse"].items():
            if label.split(":")[0] != method:
                continue
            strategy = label.split(":")[1]
            if "own" in strategy:
                what = "each held-in task its cluster's expert"
            elif strategy.startswith("mbc"):
                what = "Arrow over the cluster experts"
            elif strategy.startswith("peft-arrow"):
                what = "PEFT LoRA Arrow" + (" + GenKnowSub" if "gks" in strategy else "")
            else:
                what = "peft-sparse Arrow" + (" + GenKnowSub" if "gks" in strategy else "")
            add(label, what, scores)
    return rows


def reuse_claims(results: dict, held_in: list[str], held_out: list[str], overhead: dict | None) -> list[dict]:
    """The issue-10 bars. Best configurations are picked on the test scores, which favours Arrow (said in detail)."""
    reuse = results.get("reuse") or {}
    out_mean = {label: _mean(scores, held_out) for label, scores in reuse.items()}
    merged_out = {label: _mean(scores, held_out) for label, scores in results["merged"].items()}
    rows = []

    def pts(value: float | None) -> str:
        return _pct(value)

    sparse_arrow = {
        label: v
        for label, v in out_mean.items()
        if _is_arrow(label) and ":mbc" not in label and label.startswith("sparse") and v is not None
    }
    lora_arrow = {label: v for label, v in out_mean.items() if ":peft-arrow" in label and v is not None}
    best_sparse = max(sparse_arrow, key=sparse_arrow.get) if sparse_arrow else None
    uniform_label = f"{best_sparse.split(':')[0]}:sparse_average" if best_sparse else None
    uniform = merged_out.get(uniform_label)
    if best_sparse is not None:
        method = best_sparse.split(":")[0]
        configs = {label: v for label, v in sparse_arrow.items() if label.split(":")[0] == method}
        meeting = sum(uniform is not None and v >= uniform + ARROW_MARGIN for v in configs.values())
        rows.append(
            {
                "claim": "Arrow (sparse) ≥ uniform sparse merge + 1 pt, held-out mean",
                "lhs": pts(sparse_arrow[best_sparse]),
                "rhs": pts(uniform),
                "held": None if uniform is None else sparse_arrow[best_sparse] >= uniform + ARROW_MARGIN,
                "detail": f"best: {best_sparse} vs {uniform_label}; {meeting} of {len(configs)} Arrow configurations"
                " meet it (best picked on test scores)",
            }
        )
    if best_sparse is not None and lora_arrow:
        best_lora = max(lora_arrow, key=lora_arrow.get)
        method = best_sparse.split(":")[0]
        matched = [
            (v, lora_arrow[f"lora:peft-{label.split(':')[1]}"])
            for label, v in sparse_arrow.items()
            if label.split(":")[0] == method and f"lora:peft-{label.split(':')[1]}" in lora_arrow
        ]
        wins = sum(a >= b for a, b in matched)
        rows.append(
            {
                "claim": "Arrow (sparse) ≥ PEFT LoRA Arrow, held-out mean",
                "lhs": pts(sparse_arrow[best_sparse]),
                "rhs": pts(lora_arrow[best_lora]),
                "held": sparse_arrow[best_sparse] >= lora_arrow[best_lora],
                "detail": f"best vs best: {best_sparse} vs {best_lora}; same top_k/GenKnowSub: sparse ≥ LoRA in {wins}"
                f" of {len(matched)}",
            }
        )
    if overhead is not None:
        ratios = [
            (row["ratio_vs_merged_weights"], row)
            for row in overhead.get("rows", [])
            if row.get("experts") == OVERHEAD_EXPERTS and row.get("ratio_vs_merged_weights") is not None
        ]
        if ratios:
            worst, worst_row = max(ratios, key=lambda pair: pair[0])
            met = sum(r <= OVERHEAD_BAR for r, _ in ratios)
            rows.append(
                {
                    "claim": f"routed forward at {OVERHEAD_EXPERTS} experts ≤ {OVERHEAD_BAR:g} × merged",
                    "lhs": f"{worst:.2f} × (worst)",
                    "rhs": f"{OVERHEAD_BAR:.2f} ×",
                    "held": met == len(ratios),
                    "detail": f"met in {met} of {len(ratios)} settings (top_k × prefill/decode × threads; best"
                    f" {min(r for r, _ in ratios):.2f} ×; worst: top_k={worst_row['top_k']}, {worst_row['input']},"
                    f" {worst_row['threads']} thread(s)); from {OVERHEAD_FILE} (`{overhead.get('command', '?')}`)",
                }
            )
    return rows


def _overhead_table(overhead: tuple[Path, dict] | None) -> list[str]:
    """Routed / merged forward time at 4, 8 and 16 experts, as measured by the routing-overhead benchmark."""
    if overhead is None:
        return []
    path, data = overhead
    rows = [r for r in data.get("rows", []) if r.get("ratio_vs_merged_weights") is not None]
    if not rows:
        return []
    tokens = ", ".join(sorted({f"{r['input']} {r.get('tokens', '?')}" for r in rows}))
    lines = [
        "",
        "## Routing overhead (from the routing-overhead benchmark, not measured by this command)",
        "",
        f"Forward time of the routed model ÷ the merged model (experts merged into the weights), from `{path.name}`"
        f" (`{data.get('command', '?')}`; a {data.get('model', {}).get('num_hidden_layers', '?')}-layer Llama-shaped"
        " model; tokens per forward: " + tokens + ").",
        "",
        "| experts | threads | top_k | prefill | decode |",
        "|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["experts"], r["threads"], r["top_k"]) for r in rows})
    for experts, threads, top_k in keys:
        cells = []
        for kind in ("prefill", "decode"):
            match = [
                r
                for r in rows
                if (r["experts"], r["threads"], r["top_k"], r["input"]) == (experts, threads, top_k, kind)
            ]
            cells.append(f"{match[0]['ratio_vs_merged_weights']:.2f} ×" if match else "–")
        lines.append(f"| {experts} | {threads} | {top_k} | " + " | ".join(cells) + " |")
    return lines


def _reuse_section(results: dict, header: dict, overhead: tuple[Path, dict] | None) -> list[str]:
    if "reuse" not in results:
        return []
    held_in, held_out = header["held_in"], header["held_out"]
    lines = [
        "",
        "## Reuse: routing (Arrow) and clustering (MBC) instead of one merge",
        "",
        "The same held-in experts as the merges. Arrow routes every token to its top-k experts by the prototypes"
        " (top right-singular vectors of each expert's ΔW); GenKnowSub (gks) first subtracts the mean of the"
        " general experts, here the held-in experts themselves (no general task exists in this benchmark), for the"
        " sparse and the LoRA Arrow alike. MBC clusters the sparse experts by the cosine similarity of their deltas"
        " and merges each cluster (`sparse_average`); `pooled` = one expert trained per cluster on its tasks'"
        " pooled training data (same steps as one task expert). `-own` rows score each held-in task with its"
        " cluster's expert (compare with the per-task experts).",
        "",
        "| strategy | what | held-in mean | held-out mean |",
        "|---|---|---:|---:|",
    ]
    for row in reuse_rows(results, held_in, held_out):
        lines.append(f"| {row['label']} | {row['what']} | {_pct(row['held_in'])} | {_pct(row['held_out'])} |")
    clusters = results.get("reuse_clusters") or {}
    if clusters:
        lines += ["", "MBC clusters (silhouette on the similarity rows):", ""]
        for label, info in clusters.items():
            groups = "; ".join("{" + ", ".join(g) + "}" for g in info["clusters"])
            lines.append(f"- {label}: {groups} (silhouette {_fixed(info['silhouette'], 3)})")
    if held_out:
        rows = [("base", results["individual"]["base"]), *results["reuse"].items()]
        rows = [(label, scores) for label, scores in rows if any(t in scores for t in held_out)]
        lines += _per_task_table("Reuse strategies on each held-out task", rows, held_out)
    lines += _overhead_table(overhead)
    lines += [
        "",
        "## The reuse bar (issue 10, from this run)",
        "",
        "| claim | measured | reference | held? | detail |",
        "|---|---:|---:|---|---|",
    ]
    for row in reuse_claims(results, held_in, held_out, overhead[1] if overhead else None):
        held = "n/a" if row["held"] is None else ("yes" if row["held"] else "**NO**")
        lines.append(f"| {row['claim']} | {row['lhs']} | {row['rhs']} | {held} | {row['detail']} |")
    if overhead is None:
        lines.append(f"| routed forward ≤ 2 × merged | – | – | n/a | no {OVERHEAD_FILE} found |")
    return lines


def _step_time_claim(results: dict) -> list[str]:
    """The causal bar on cost: a sparse training step ≤ 1.1 × LoRA's (from the recorded training times)."""
    cost = results.get("training_cost", {})
    lora = (cost.get("lora") or {}).get("seconds_per_step")
    lines = []
    for method, info in cost.items():
        if method.startswith("sparse") and lora and info.get("seconds_per_step"):
            ratio = info["seconds_per_step"] / lora
            held = "yes" if ratio <= 1.1 else "**NO**"
            lines.append(f"| {method} step ≤ 1.1 × LoRA's | {ratio:.2f} × | 1.10 × | {held} | training loop times |")
    return lines


def _generation_sections(results: dict, held_in: list[str], held_out: list[str], generate_items) -> list[str]:
    """Exact match and Rouge-L of greedy answers, and a few generated examples (causal scorer only)."""
    generation = results.get("generation") or {}
    if not generation:
        return []

    def mean_metric(label: str, tasks: list[str], key: str) -> float | None:
        values = [generation[label][t][key] for t in tasks if t in generation[label] and key in generation[label][t]]
        return mean(values) if values else None

    lines = [
        "",
        "## Greedy generation (first test items of each task)",
        "",
        f"Each model answers the first {generate_items} test items of every task by greedy decoding; exact match"
        " (case and punctuation ignored) and Rouge-L F1 against the correct candidate, in %.",
        "",
        "| model | held-in exact match | held-in Rouge-L | held-out exact match | held-out Rouge-L |",
        "|---|---:|---:|---:|---:|",
    ]
    for label in generation:
        cells = [
            _pct(mean_metric(label, tasks, key)) for tasks in (held_in, held_out) for key in ("exact_match", "rouge_l")
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    task = held_in[0] if held_in else None
    # the base model, every single-task expert, and each method's first merge (not every combination)
    firsts = {label.split(":")[0]: label for label in reversed(generation) if ":" in label}
    candidates = [label for label in generation if ":" not in label] + list(reversed(firsts.values()))
    shown = [label for label in candidates if task in generation[label] and generation[label][task].get("samples")]
    if shown:
        lines += ["", f"### Generated answers on `{task}` (first test items)", ""]
        samples = {label: generation[label][task]["samples"] for label in shown}
        for i, sample in enumerate(samples[shown[0]]):
            prompt = sample["prompt"].replace("\n", " · ")
            lines += [f"**Prompt:** {prompt}  ", f"**Correct:** {sample['answer']}  "]
            for label in shown:
                if i < len(samples[label]):
                    text = samples[label][i]["generated"]
                    lines.append(f"- `{label}`: {text if len(text) <= 160 else text[:157] + '...'!r}")
            lines.append("")
    return lines


def _cost_section(results: dict, header: dict) -> list[str]:
    cost = results.get("training_cost") or {}
    if not any(info.get("seconds_per_step") for info in cost.values()):
        return []
    lines = [
        "",
        "## Training cost (measured while the experts trained)",
        "",
        f"Batch {header['batch_size']}, {header['steps']} steps per expert; mean over the method's held-in experts"
        " (the first step excluded). Extra peak memory = the peak RSS of mask calibration and training above the"
        " RSS before them (activations, gradients, optimizer state), the largest over the experts; a lower bound,"
        " as memory freed by earlier work in the same process is reused without raising the RSS (`python -m"
        " benchmarks.quality.step_cost` measures each method in a fresh process). Timings depend on what else ran"
        " on the machine at the time.",
        "",
        "| method | s / step | × LoRA | mask calibration s / expert | extra peak memory (MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    lora = (cost.get("lora") or {}).get("seconds_per_step")
    for method, info in cost.items():
        step = info.get("seconds_per_step")
        ratio = f"{step / lora:.2f}" if step and lora else "–"
        cells = [
            _fixed(step, 3),
            ratio,
            _fixed(info.get("calibration_seconds"), 1),
            _fixed(info.get("peak_extra_mb"), 0),
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict, header: dict, overhead: tuple[Path, dict] | None = None) -> str:
    held_in, held_out = header["held_in"], header["held_out"]
    scorer = header.get("scorer", "encoder")
    how = (
        "Scores are test accuracy in %: the candidate with the highest length-normalised log-likelihood as the"
        " answer of the chat prompt is the model's choice. Chance is 1/K (K candidates per item)."
        if scorer == "causal"
        else "Scores are test accuracy in %. Chance is 1/K (K candidates per item)."
    )
    lines = [
        "# Quality benchmark: WordNet choose-the-candidate tasks" + (" (causal LM)" if scorer == "causal" else ""),
        "",
        f"Command: `{header['command']}`  ",
        f"Model: `{header['model']}` · seed {header['seed']} · {header['steps']} steps · batch {header['batch_size']}"
        f" · LoRA-matched rank {header['rank']} · test items per task ≤ {header['max_eval'] or 'all'}"
        f" · {header['date']}  ",
        f"This command took {header.get('seconds', '?')} s and trained"
        f" {header.get('experts_trained_by_this_command', '?')} experts (others came from the expert cache).",
        "",
        how,
        *_sampling_error(results.get("test_items", {}), held_in),
        "",
        "## Single-task experts (held-in tasks)",
        "",
        "| method | trainable params | lr | " + " | ".join(held_in) + " | mean |",
        "|---|---:|---:|" + "---:|" * (len(held_in) + 1),
    ]
    for method, scores in results["individual"].items():
        lr = results["lr_search"].get(method, {}).get("best_lr")
        params = results["trainable_params"].get(method, 0)
        cells = " | ".join(_pct(scores.get(t)) for t in held_in)
        lines.append(
            f"| {method} | {params:,} | {'' if lr is None else f'{lr:g}'} | {cells} | "
            f"**{_pct(_mean(scores, held_in))}** |"
        )
    lines += [
        "",
        "## Merged experts (one model for all held-in tasks)",
        "",
        "| merge | held-in mean | held-out mean | % of its experts' mean |",
        "|---|---:|---:|---:|",
    ]
    base = results["individual"]["base"]
    lines.append(f"| base (zero-shot) | {_pct(_mean(base, held_in))} | {_pct(_mean(base, held_out))} | |")
    for label, scores in results["merged"].items():
        own = _mean(results["individual"].get(label.split(":")[0], {}), held_in)
        merged_in = _mean(scores, held_in)
        ratio = "" if not own or merged_in is None else f"{100 * merged_in / own:.1f}"
        lines.append(f"| {label} | {_pct(merged_in)} | {_pct(_mean(scores, held_out))} | {ratio} |")
    if results["merged"]:
        lines += _per_task_table("Merged models on each held-in task", results["merged"].items(), held_in)
    if held_out:
        rows = [("base", base), *results["merged"].items()]
        lines += _per_task_table("Held-out tasks (never trained on)", rows, held_out)
    if results["merge_curve"]:
        sizes = sorted({int(n) for c in results["merge_curve"].values() for n in c})
        lines += [
            "",
            "## Merged held-in score vs number of merged experts",
            "",
            "The first n held-in experts merged, scored on those n tasks; in brackets, % of the same experts' own"
            " mean (the tasks differ in difficulty, so the retention is the comparable number).",
            "",
            "| merge | " + " | ".join(str(n) for n in sizes) + " |",
            "|---|" + "---:|" * len(sizes),
        ]
        for label, curve in results["merge_curve"].items():
            curve = {int(k): v for k, v in curve.items()}
            own = results["individual"].get(label.split(":")[0], {})
            cells = []
            for n in sizes:
                experts = _mean(own, held_in[:n])
                kept = f" ({100 * curve[n] / experts:.1f} %)" if n in curve and experts else ""
                cells.append(_pct(curve.get(n)) + kept)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if results.get("mask_overlap"):
        lines += [
            "",
            "## Mask overlap of the held-in sparse experts",
            "",
            "Identical masks make `sparse_average` plain averaging (each delta diluted n-fold); disjoint masks keep",
            "every expert's delta whole. Union ÷ expert = entries of the merged adapter per entry of one expert.",
            "",
            "| method | mean pairwise Jaccard | sign conflicts on shared entries | union ÷ expert |",
            "|---|---:|---:|---:|",
        ]
        for method, info in results["mask_overlap"].items():
            cells = [_fixed(info["mean_jaccard"], 3), _fixed(info["sign_conflict_rate"], 3)]
            cells.append(_fixed(info["union_over_mean_expert"], 2))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## The bar (from this run)",
        "",
        "| claim | measured | reference | held? | detail |",
        "|---|---:|---:|---|---|",
    ]
    for row in claims(results, held_in, scorer):
        held = "n/a" if row["held"] is None else ("yes" if row["held"] else "**NO**")
        lines.append(f"| {row['claim']} | {_pct(row['lhs'])} | {_pct(row['rhs'])} | {held} | {row['detail']} |")
    if scorer == "causal":
        lines += _step_time_claim(results)
    lines += _reuse_section(results, header, overhead)
    lines += _generation_sections(results, held_in, held_out, header.get("generate_items"))
    lines += _cost_section(results, header)
    lines += [
        "",
        "## Learning-rate search (validation accuracy, first held-in tasks)",
        "",
        "A grid whose best rate is on an edge is extended one half-decade past it"
        + _extension_rule(header.get("lr_extensions", 1)),
        "",
    ]
    for method, search in results["lr_search"].items():
        grid = ", ".join(f"{lr}: {_pct(v)}" for lr, v in search["grid"].items())
        edges = {1: "up", -1: "down"}
        extended = ", ".join(f"extended {edges[side]}" for side in search.get("extended", []))
        tasks = ", ".join(search["tasks"]) + (f"; {extended}" if extended else "")
        lines.append(f"- {method}: {grid} → **{search['best_lr']:g}** (tasks: {tasks})")
    return "\n".join(lines) + "\n"


def _finish_figure(fig, ax, ylabel: str, title: str, path: Path, legend_columns: int = 1) -> Path:
    """Label, add the legend, write ``path`` atomically and close the figure."""
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=legend_columns)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, default_mode("file"))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        plt.close(fig)
    return path


def _zoom(ax) -> None:
    """Start the y axis a little below the lowest bar or line, so differences of a few points are visible."""
    heights = [patch.get_height() for patch in ax.patches] + [line.get_ydata()[0] for line in ax.get_lines()]
    if heights:
        ax.set_ylim(max(0.0, min(heights) - 5), min(100.0, max(heights) + 3))


def plots(results: dict, header: dict, out: Path, prefix: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held_in, held_out = header["held_in"], header["held_out"]
    written = []
    methods = list(results["individual"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(held_in) + 2), 4))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        scores = results["individual"][method]
        ax.bar(
            [j + i * width for j in range(len(held_in))], [100 * scores.get(t, 0) for t in held_in], width, label=method
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(held_in))], held_in, rotation=30, ha="right")
    _zoom(ax)
    written.append(
        _finish_figure(
            fig, ax, "test accuracy (%)", "Single-task experts", out / f"{prefix}per_task.png", legend_columns=2
        )
    )

    labels = list(results["merged"])
    if labels:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4))
        own = [100 * (_mean(results["individual"].get(lab.split(":")[0], {}), held_in) or 0) for lab in labels]
        ax.bar([i - 0.3 for i in range(len(labels))], own, 0.3, label="experts (each on its task)")
        ax.bar(
            range(len(labels)),
            [100 * (_mean(results["merged"][lab], held_in) or 0) for lab in labels],
            0.3,
            label="merged, held-in",
        )
        if held_out:
            ax.bar(
                [i + 0.3 for i in range(len(labels))],
                [100 * (_mean(results["merged"][lab], held_out) or 0) for lab in labels],
                0.3,
                label="merged, held-out",
            )
        base = results["individual"]["base"]
        ax.axhline(100 * (_mean(base, held_in) or 0), color="gray", ls="--", label="base, held-in")
        if held_out:
            ax.axhline(100 * (_mean(base, held_out) or 0), color="gray", ls=":", label="base, held-out")
        _zoom(ax)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        written.append(
            _finish_figure(
                fig, ax, "mean accuracy (%)", "Merged vs individual experts", out / f"{prefix}merged_vs_individual.png"
            )
        )
    if results.get("reuse"):
        rows = reuse_rows(results, held_in, held_out)
        fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(rows) + 2), 4.5))
        xs = range(len(rows))
        for offset, key, name in ((-0.2, "held_in", "held-in mean"), (0.2, "held_out", "held-out mean")):
            shown = [(x + offset, 100 * r[key]) for x, r in zip(xs, rows, strict=True) if r[key] is not None]
            if shown:
                ax.bar([x for x, _ in shown], [v for _, v in shown], 0.4, label=name)
        base = rows[0]
        for key, style in (("held_in", "--"), ("held_out", ":")):
            if base[key] is not None:
                ax.axhline(100 * base[key], color="gray", ls=style, lw=0.8, label=f"base, {key.replace('_', '-')}")
        _zoom(ax)
        ax.set_xticks(list(xs), [r["label"] for r in rows], rotation=60, ha="right", fontsize=7)
        written.append(
            _finish_figure(
                fig,
                ax,
                "mean accuracy (%)",
                "Reuse: uniform merge vs Arrow routing vs MBC clusters",
                out / f"{prefix}reuse.png",
            )
        )
    if results["merge_curve"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, curve in results["merge_curve"].items():
            xs = sorted(int(k) for k in curve)
            ax.plot(xs, [100 * {int(k): v for k, v in curve.items()}[x] for x in xs], marker="o", label=label)
        ax.set_xlabel("number of merged experts")
        written.append(
            _finish_figure(fig, ax, "merged held-in accuracy (%)", "Merge-size curve", out / f"{prefix}merge_curve.png")
        )
    return written


def _extension_rule(times: int) -> str:
    return " (once per side)." if times == 1 else f", up to {times} times per side while the newest rate wins."


def write_report(results: dict, header: dict, out_dir: str | os.PathLike, prefix: str = "quality") -> dict[str, Path]:
    """Write ``<prefix>.json``, ``<prefix>.md`` and PNG plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "header": header,
        "results": results,
        "claims": claims(results, header["held_in"], header.get("scorer", "encoder")),
    }
    overhead = read_overhead(out) if "reuse" in results else None
    if "reuse" in results:
        payload["reuse_claims"] = reuse_claims(
            results, header["held_in"], header["held_out"], overhead[1] if overhead else None
        )
    atomic_write_text(out / f"{prefix}.json", json.dumps(payload, indent=2, default=str))
    md = markdown(results, header, overhead)
    atomic_write_text(out / f"{prefix}.md", md)
    pngs = plots(results, header, out, f"{prefix}_")
    return {"json": out / f"{prefix}.json", "markdown": out / f"{prefix}.md", **{p.stem: p for p in pngs}}
