"""The sweep's table: sweep.sh trains the variants and runs probe.py and ood.py on each; this
aggregates their JSON results into OUT/table.md, mean ± std over seeds, and checks the paper's
orderings.

    python sweep.py runs/sweep    # reads runs/sweep/<variant>_s<seed>/{probe,ood}_builtin*.json
"""

import glob
import json
import os
import re

import numpy as np

import plots
from util import make_parser, write_atomic


# sweep.sh's run names -> what they are; the paper's numbers (ImageNet linear probe / OOD AUROC,
# CC12M pretraining)
VARIANTS = {
    "m3ae": "M3AE (text mask 0.75, 100% paired)",
    "mae": "MAE (same recipe, --no-text)",
    "text015": "M3AE, text mask 0.15",
    "paired10": "M3AE, 10% paired",
    "paired0": "M3AE, 0% paired",
    "textw2": "M3AE, text loss weight 2.0 (not the paper's 0.5)",
    "random": "random-init encoder (floor)",
}
ORDERINGS = [  # (what, metric, better variant, worse variant, the paper's numbers)
    ("1. M3AE > MAE, linear probe", "top1", "m3ae", "mae", "59.4 vs 45.2"),
    ("1. M3AE > MAE, kNN", "knn_top1", "m3ae", "mae", "(paper: linear probe only)"),
    ("1. M3AE > MAE, linear probe, colour label", "top1_colour", "m3ae", "mae",
     "(ours: built-in data)"),
    ("1. M3AE > MAE, kNN, colour label", "knn_top1_colour", "m3ae", "mae", "-"),
    ("2. text mask 0.75 > 0.15, linear probe", "top1", "m3ae", "text015", "64.1 vs 53.3"),
    ("2. text mask 0.75 > 0.15, kNN", "knn_top1", "m3ae", "text015", "-"),
    ("2. text mask 0.75 > 0.15, linear probe, colour label", "top1_colour", "m3ae", "text015", "-"),
    ("3. paired 100% > 10%, linear probe", "top1", "m3ae", "paired10", "59.4 vs 53.3"),
    ("3. paired 10% > 0%, linear probe", "top1", "paired10", "paired0", "53.3 vs 45.2"),
    ("3. paired 100% > 10%, kNN", "knn_top1", "m3ae", "paired10", "-"),
    ("3. paired 10% > 0%, kNN", "knn_top1", "paired10", "paired0", "-"),
    ("3. paired 100% > 10%, linear probe, colour label", "top1_colour", "m3ae", "paired10", "-"),
    ("3. paired 10% > 0%, linear probe, colour label", "top1_colour", "paired10", "paired0", "-"),
    ("4. M3AE > MAE, OOD AUROC Mahalanobis", "ood_mahalanobis", "m3ae", "mae", "71.4 vs 69.0"),
    ("4. M3AE > MAE, OOD AUROC MSP", "ood_msp", "m3ae", "mae", "78.5 vs 77.2"),
]


def result_tag(name):
    """A result file's (kind, metric suffix, recipe) from its name, or None: probe_<dataset>_fast
    [_paper][_random_init].json -> ("probe", "" for builtin / "_colour" for builtin_colour /
    "_<dataset>"), ood_<dataset>[_vs_<ood>][_paper][_random_init].json -> ("ood", "" for builtin /
    "_<rest>")."""
    m = re.fullmatch(r"(probe|ood)_(.+?)(_paper)?(_random_init)?\.json", name)
    if not m or (m.group(1) == "probe" and not m.group(2).endswith("_fast")):
        return None
    kind, rest = m.group(1), m.group(2).removesuffix("_fast")
    tag = {"builtin": "", "builtin_colour": "_colour"}.get(rest, "_" + rest)
    return kind, tag, "paper" if m.group(3) else "grid", bool(m.group(4))


def collect(sweep_dir):
    """{variant: {seed: {metric: value}}} from every SWEEP_DIR/<variant>_s<seed>/ probe_*_fast.json
    (top1<tag>, knn_top1<tag>) and ood_*.json (ood_<score><tag>), tag as result_tag says (the
    built-in shape label has none); a --recipe paper result counts where no grid result is; the
    random-init floor from <variant>_s<seed>/*_random_init.json (sweep.sh evaluates it beside the
    first variant; every variant has the same encoder, so any folder's is the same floor)."""
    runs = {}
    for folder in sorted(glob.glob(os.path.join(sweep_dir, "*_s*"))):
        m = re.fullmatch(r"(.+)_s(\d+)", os.path.basename(folder))
        if not m:
            continue
        variant, seed = m.group(1), int(m.group(2))
        files = sorted((result_tag(f), f) for f in os.listdir(folder) if result_tag(f))
        for (kind, tag, recipe, random_init), fname in files:
            name = "random" if random_init else variant
            if recipe == "paper" and any(k[:2] == (kind, tag) and k[2] == "grid"
                                         and k[3] == random_init for k, _ in files):
                continue  # the grid's result is the one that counts
            with open(os.path.join(folder, fname)) as f:
                r = json.load(f)
            row = runs.setdefault(name, {}).setdefault(seed, {})
            if kind == "probe":
                row.update({k + tag: r[k] for k in ("top1", "knn_top1")})
                steps = r.get("pretraining", {}).get("steps", "?")
                row["setup"] = (f"pretraining steps {steps}, probe {r.get('train_size', '?')} "
                                f"train / {r.get('test_size', '?')} test images")
            else:
                row.update({f"ood_{k}{tag}": v["auroc"] for k, v in r["scores"].items()})
    return runs


def tags(runs, prefix):
    """The metric suffixes present for metric `prefix` (e.g. "top1"), the built-in ones first."""
    found = {k[len(prefix):] for seeds in runs.values() for r in seeds.values() for k in r
             if k.startswith(prefix)}
    return sorted(found, key=lambda t: (t not in ("", "_colour"), t))


def mean_std(values):
    """'mean ± sample std (n)'; a single value has no spread."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return "-"
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def label(tag):
    return {"": "", "_colour": ", colour"}.get(tag, f", {tag[1:]}")


def write_table(sweep_dir):
    runs = collect(sweep_dir)
    probe_tags = tags(runs, "top1") if runs else [""]
    ood_tags = sorted({k.split("mahalanobis", 1)[1] for s in runs.values() for r in s.values()
                       for k in r if k.startswith("ood_mahalanobis")}) or [""]
    builtin = set(probe_tags) <= {"", "_colour"}
    metrics = [(m + t, f"{what} top-1{label(t)}") for t in (["", "_colour"] if builtin else
                                                           probe_tags)
               for m, what in (("top1", "linear probe"), ("knn_top1", "kNN"))]
    if builtin:  # the built-in table's column order: both probes, then both colour probes
        metrics = [metrics[0], metrics[1], metrics[2], metrics[3]]
    metrics += [(f"ood_{sc}{t}", f"OOD AUROC {name}{label(t)}") for t in ood_tags
                for sc, name in (("mahalanobis", "Mahalanobis"),
                                 ("relative_mahalanobis", "rel. Mahalanobis"), ("msp", "MSP"))]
    lines = ["| run | seeds | " + " | ".join(name for _, name in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for variant in [*[v for v in VARIANTS if v in runs], *sorted(set(runs) - set(VARIANTS))]:
        seeds = runs[variant]
        cells = [mean_std([r[k] for r in seeds.values() if k in r]) for k, _ in metrics]
        lines.append(f"| {VARIANTS.get(variant, variant)} | {len(seeds)} | " + " | ".join(cells)
                     + " |")
    lines += ["", "| paper's ordering | paper | ours (mean ± std) | holds on the mean | seeds "
              "where it holds |", "|---|---|---|---|---|"]
    orderings = ORDERINGS if builtin else [
        (f"{what}{label(t)}", metric + t, a, b, paper)
        for t in probe_tags for what, metric, a, b, paper in ORDERINGS
        if "colour" not in what and not metric.startswith("ood")] + [
        (f"{what}{label(t)}", metric + t, a, b, paper) for t in ood_tags
        for what, metric, a, b, paper in ORDERINGS if metric.startswith("ood")]
    for what, metric, a, b, paper in orderings:
        ra, rb = runs.get(a, {}), runs.get(b, {})
        shared = sorted(s for s in set(ra) & set(rb) if metric in ra[s] and metric in rb[s])
        if not shared:
            lines.append(f"| {what} | {paper} | not run | - | - |")
            continue
        va, vb = [ra[s][metric] for s in shared], [rb[s][metric] for s in shared]
        wins = sum(x > y for x, y in zip(va, vb))
        holds = "yes" if np.mean(va) > np.mean(vb) else "**no**"
        lines.append(f"| {what} | {paper} | {mean_std(va)} vs {mean_std(vb)} | {holds} | "
                     f"{wins}/{len(shared)} |")
    setups = sorted({r["setup"] for seeds in runs.values() for r in seeds.values() if "setup" in r})
    lines += ["", f"Runs in {sweep_dir}: " + "; ".join(setups) + ". Mean ± sample std over seeds; "
              "an ordering \"holds\" when the first mean is higher; the last column counts seeds "
              "where it holds pairwise."]
    table = "\n".join(lines) + "\n"
    write_atomic(os.path.join(sweep_dir, "table.md"), lambda f: f.write(table), "w")
    print(table)
    chart = ablation_chart(runs, [m for m, _ in metrics if not m.startswith("ood")])
    if chart is not None:
        plots.save_png(chart, os.path.join(sweep_dir, "ablations.png"))
        print(f"wrote {os.path.join(sweep_dir, 'ablations.png')}")
    return runs


def ablation_chart(runs, metrics):
    """The paper's ablations (Figs. 3-5) as bars: one panel per metric, a bar per variant (mean and
    std over seeds), the random-init encoder as a dashed line."""
    panels = []
    for metric in metrics:
        bars = {}
        for variant in ("m3ae", "mae", "text015", "paired10", "paired0"):
            values = [r[metric] for r in runs.get(variant, {}).values() if metric in r]
            if values:
                v = np.asarray(values, dtype=float)
                bars[variant] = (v.mean(), v.std(ddof=1) if len(v) > 1 else 0.0)
        floor = [r[metric] for r in runs.get("random", {}).values() if metric in r]
        if bars:
            panels.append(plots.bar_chart(bars, metric.replace("_", " "),
                                          floor=float(np.mean(floor)) if floor else None))
    return plots.grid(panels, cols=min(2, len(panels)), title="mean ± std over seeds") if panels \
        else None


def main(argv=None):
    p = make_parser(__doc__)
    p.add_argument("sweep_dir", help="the OUT folder of a sweep.sh run")
    args = p.parse_args(argv)
    if not os.path.isdir(args.sweep_dir):
        p.error(f"sweep_dir: {args.sweep_dir} is not a folder")
    return write_table(args.sweep_dir)


if __name__ == "__main__":
    main()
