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

from checkpoint import write_atomic
from util import make_parser


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


def collect(sweep_dir):
    """{variant: {seed: {metric: value}}} from SWEEP_DIR/<variant>_s<seed>/ probe_builtin_fast.json
    (shape label), probe_builtin_colour_fast.json (colour label: metrics *_colour) and
    ood_builtin.json (each also read with the _paper suffix probe.py gives --recipe paper results);
    the random-init floor from m3ae_s<seed>/*_random_init.json."""
    runs = {}
    for folder in sorted(glob.glob(os.path.join(sweep_dir, "*_s*"))):
        m = re.fullmatch(r"(.+)_s(\d+)", os.path.basename(folder))
        if not m:
            continue
        variant, seed = m.group(1), int(m.group(2))
        for suffix, name in (("", variant), ("_random_init", "random")):
            if suffix and variant != "m3ae":
                continue
            row = {}
            for stem, fields, tag in (("probe_builtin_fast", ("top1", "knn_top1"), ""),
                                      ("probe_builtin_colour_fast", ("top1", "knn_top1"),
                                       "_colour"),
                                      ("ood_builtin", None, "")):
                found = [os.path.join(folder, f"{stem}{recipe}{suffix}.json")
                         for recipe in ("", "_paper")]
                path = next((f for f in found if os.path.exists(f)), found[0])
                if not os.path.exists(path):
                    continue
                with open(path) as f:
                    r = json.load(f)
                if fields:
                    row.update({k + tag: r[k] for k in fields})
                    steps = r.get("pretraining", {}).get("steps", "?")
                    row["setup"] = (f"pretraining steps {steps}, probe {r.get('train_size', '?')} "
                                    f"train / {r.get('test_size', '?')} test images")
                else:
                    row.update({f"ood_{s}": v["auroc"] for s, v in r["scores"].items()})
            if row:
                runs.setdefault(name, {})[seed] = row
    return runs


def mean_std(values):
    """'mean ± sample std (n)'; a single value has no spread."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return "-"
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def write_table(sweep_dir):
    runs = collect(sweep_dir)
    metrics = [("top1", "linear probe top-1"), ("knn_top1", "kNN top-1"),
               ("top1_colour", "linear probe top-1, colour"),
               ("knn_top1_colour", "kNN top-1, colour"),
               ("ood_mahalanobis", "OOD AUROC Mahalanobis"),
               ("ood_relative_mahalanobis", "OOD AUROC rel. Mahalanobis"),
               ("ood_msp", "OOD AUROC MSP")]
    lines = ["| run | seeds | " + " | ".join(name for _, name in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for variant in [*[v for v in VARIANTS if v in runs], *sorted(set(runs) - set(VARIANTS))]:
        seeds = runs[variant]
        cells = [mean_std([r[k] for r in seeds.values() if k in r]) for k, _ in metrics]
        lines.append(f"| {VARIANTS.get(variant, variant)} | {len(seeds)} | " + " | ".join(cells)
                     + " |")
    lines += ["", "| paper's ordering | paper | ours (mean ± std) | holds on the mean | seeds "
              "where it holds |", "|---|---|---|---|---|"]
    for what, metric, a, b, paper in ORDERINGS:
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
    return runs


def main(argv=None):
    p = make_parser(__doc__)
    p.add_argument("sweep_dir", help="the OUT folder of a sweep.sh run")
    args = p.parse_args(argv)
    if not os.path.isdir(args.sweep_dir):
        p.error(f"sweep_dir: {args.sweep_dir} is not a folder")
    return write_table(args.sweep_dir)


if __name__ == "__main__":
    main()
