"""Out-of-distribution detection on a frozen encoder (paper section 4.3) — one flat script.

    python ood.py --ckpt runs/default/ckpt.pt                # built-in: test vs held-out shapes
    python ood.py --ckpt runs/default/ckpt.pt --random-init  # the floor: untrained, same shape
    python ood.py --ckpt ckpt.pt --train-dir c10/train --test-dir c10/test --ood-dir svhn/test

Features are probe.py's (CLS after the final norm, image only, cached with the same keys: running
probe.py first makes the in-distribution ones free). Fit on the in-distribution train split (with
labels, at least 2 classes), score its test split and the OOD split. Scores, higher = more OOD:
  mahalanobis           min over classes of the squared Mahalanobis distance to the class mean,
                        one covariance shared by all classes (Lee et al. 2018), fitted on the
                        whole train split
  relative_mahalanobis  that minus the squared distance under one Gaussian fitted on all train
                        features, "background" (Ren et al. 2021)
  msp                   minus the log of the maximum softmax probability (MSP's ranking, Hendrycks
                        & Gimpel 2017) of probe.py's linear head (fast mode, the same --recipe).
                        Read it beside the head's test top-1 (msp_head in the JSON): a head that
                        barely left its init reads far-away OOD features as MORE confident (AUROC
                        below 50; docs/probe.md).
Covariances are inverted with a pseudo-inverse that drops eigenvalues below 1e-6 x the largest: the
CLS feature comes out of a LayerNorm, so its covariance is singular (one hyperplane holds them all).

Metrics (numpy, ties handled; tests/test_ood.py checks them against brute-force definitions), in %,
positive = in-distribution, the detector's confidence = -score:
  auroc     P(confidence of an in-distribution sample > that of an OOD sample) + 0.5 P(tie);
            symmetric: the same number with OOD as positive and the score as is
  fpr95     share of OOD samples accepted at the threshold that accepts 95% of in-distribution ones
  aupr_in   average precision with in-distribution as positive (confidence as the ranking)
  aupr_out  average precision with OOD as positive (score as the ranking)
No metric from an empty split or non-finite scores (an error instead); the JSON never holds NaN.
Writes ood_<dataset>_vs_<ood folder>[_paper][_random_init].json next to the checkpoint (built-in:
ood_builtin[_paper][_random_init].json), listed in its outputs.txt (evalcommon.py).
"""

import os
import time

import numpy as np
import torch

import plots
import probe
from checkpoint import CheckpointError, pretraining_info
from evalcommon import (add_data_args, add_encoder_args, check_paths, die, eval_data, folder_name,
                        load_encoder, need_classes, out_path_for, result_name, write_output,
                        write_result)
from util import make_parser

# -----------------------------------------------------------------------------
# metrics: scores of the positive and negative class, higher = more positive


def average_ranks(x):
    """1-based ranks of x in ascending order, tied values sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]  # first element of each run of equal values
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + ends + 1) / 2)[np.cumsum(first) - 1]  # mean of ranks start+1 .. end
    return ranks


def auroc(pos, neg):
    """P(pos > neg) + 0.5 P(pos == neg) over all pairs: Mann-Whitney's U from average ranks."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    ranks = average_ranks(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def counts_at_thresholds(pos, neg):
    """Every distinct score t, descending, with TP(t) = #pos >= t and FP(t) = #neg >= t: the points
    of the ROC and precision-recall curves (tied scores enter together, never one at a time)."""
    scores = np.concatenate([pos, neg]).astype(np.float64)
    is_pos = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    order = np.argsort(-scores, kind="mergesort")
    s, labels = scores[order], is_pos[order]
    last = np.r_[s[1:] != s[:-1], True]  # last element of each run of equal scores
    return s[last], np.cumsum(labels)[last], np.cumsum(1 - labels)[last]


def fpr_at_tpr(pos, neg, tpr=0.95):
    """The lowest false-positive rate among thresholds whose true-positive rate is >= `tpr`."""
    _, tp, fp = counts_at_thresholds(pos, neg)
    reached = tp >= tpr * len(pos) - 1e-9
    return (fp[reached] / len(neg)).min()


def average_precision(pos, neg):
    """Sum over distinct thresholds (descending) of (recall step) x precision: the step-wise area
    under the precision-recall curve, without interpolation (scikit-learn's definition)."""
    _, tp, fp = counts_at_thresholds(pos, neg)
    precision, recall = tp / (tp + fp), tp / len(pos)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def ood_metrics(score_in, score_ood):
    """The four metrics in % of one score (higher = more OOD), positive = in-distribution. Empty or
    non-finite scores are an error (ValueError): they would give NaN or a meaningless number."""
    conf_in, conf_ood = -np.asarray(score_in, np.float64), -np.asarray(score_ood, np.float64)
    for name, s in (("in-distribution", conf_in), ("OOD", conf_ood)):
        if s.size == 0:
            raise ValueError(f"no {name} score: no metric from no sample")
        if not np.isfinite(s).all():
            bad = int((~np.isfinite(s)).sum())
            raise ValueError(f"{bad} of {s.size} {name} scores are not finite")
    return dict(auroc=100 * auroc(conf_in, conf_ood),
                fpr95=100 * fpr_at_tpr(conf_in, conf_ood, 0.95),
                aupr_in=100 * average_precision(conf_in, conf_ood),
                aupr_out=100 * average_precision(-conf_ood, -conf_in))


# -----------------------------------------------------------------------------
# scores


def fit_gaussians(x, y, rcond=1e-6):
    """Class means, the shared (within-class) covariance's pseudo-inverse, and the background
    Gaussian (mean and covariance pseudo-inverse of all of x). Maximum-likelihood covariances
    (divided by N), in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y)
    classes = np.unique(y)
    means = np.stack([x[y == k].mean(0) for k in classes])
    centred = x - means[np.searchsorted(classes, y)]
    mean0 = x.mean(0)
    background = x - mean0
    pinv = lambda c: np.linalg.pinv(c, rcond=rcond, hermitian=True)
    return dict(means=means, precision=pinv(centred.T @ centred / len(x)), mean0=mean0,
                precision0=pinv(background.T @ background / len(x)))


def squared_mahalanobis(x, means, precision):
    """(N, K) squared distances of each row of x to each row of means: (x - m)^T P (x - m), expanded
    as x'Px - 2 x'Pm + m'Pm so that no (N, K, D) array is formed (K may be 1000 classes)."""
    xp = x @ precision
    mpm = ((means @ precision) * means).sum(1)
    return (xp * x).sum(1)[:, None] - 2 * xp @ means.T + mpm[None, :]


def mahalanobis_scores(g, x):
    """(Mahalanobis, relative Mahalanobis) scores, higher = more OOD. Relative (Ren et al.): min_k
    [MD_k - MD_0] = min_k MD_k - MD_0, MD_0 the distance under the background Gaussian."""
    x = np.asarray(x, np.float64)
    md = squared_mahalanobis(x, g["means"], g["precision"]).min(1)
    md0 = squared_mahalanobis(x, g["mean0"][None], g["precision0"])[:, 0]
    return md, md - md0


@torch.no_grad()
def msp_scores(head, x):
    """MSP as a score, higher = more OOD: minus the log of the maximum softmax probability, in
    float64. The log ranks samples exactly as the probability does (and every metric here reads only
    the ranking), but keeps apart confident samples whose probability rounds to 1.0."""
    logits = head(x).double()
    top = logits.max(dim=1, keepdim=True)
    others = (logits - top.values).exp().scatter(1, top.indices, 0.0)  # exp(l_j - l_max), j != max
    # -log p_max = log(1 + sum_j exp(l_j - l_max)), exact down to 1e-308
    return torch.log1p(others.sum(dim=1)).numpy()


# -----------------------------------------------------------------------------


def build_parser():
    p = make_parser(__doc__, prog="ood.py")
    add_encoder_args(p)
    add_data_args(p)
    probe.add_head_args(p, full_mode=False)
    p.add_argument("--ood-dir", help="folder of OOD images (any layout, read recursively); if not "
                   "given, the built-in data's held-out shapes")
    p.add_argument("--ood-size", type=int, help="OOD images; if not given, all (built-in: the "
                   "split's 2000). On a folder a seeded random subset (--data-seed)")
    return p


def get_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not args.ckpt and not args.random_init:
        p.error("give --ckpt (or --random-init [--preset])")
    folders = [args.train_dir, args.test_dir, args.ood_dir]
    if any(folders) and not all(folders):
        p.error("real data needs all of --train-dir (in-distribution, class folders), --test-dir "
                "and --ood-dir")
    probe.check_head_args(p, args)
    check_paths(p, args, ("train", "test", "val", "ood"), purpose="an OOD score")
    return args


def histograms_png(raw, scores, name, ood_name, json_path, run_dir=None):
    """The paper's Fig. 6 beside the JSON: per score, the histograms of the in-distribution test
    images and of the OOD images (higher = more OOD). Returns its path."""
    panels = [plots.histograms({f"in: {name}": a, f"OOD: {ood_name}": b},
                               f"{score} (AUROC {scores[score]['auroc']:.1f})", "score")
              for score, (a, b) in raw.items()]
    path = os.path.splitext(json_path)[0] + ".png"
    sheet = plots.grid(panels, cols=len(panels), title=f"OOD scores: {name} test vs {ood_name}")
    write_output(path, lambda f: sheet.save(f, format="PNG"), "png", folder=run_dir)
    return path


def main(argv=None):
    args = get_args(argv)
    t0 = time.perf_counter()
    try:
        model, ckpt = load_encoder(args.ckpt, args.random_init, args.preset, args.seed, args.device)
    except CheckpointError as e:
        die("ood.py", f"--ckpt {e}")
    d = eval_data(args, ckpt, splits=("train", "test", "val", "ood"))
    model_key = probe.weights_hash(model)
    train = probe.split_features(model, d, "train", model_key)
    test = probe.split_features(model, d, "test", model_key)
    out_split = probe.split_features(model, d, "ood", model_key)
    need_classes("ood.py", train, "an OOD score")
    x_in, x_ood = test.x, out_split.x
    t_features = time.perf_counter() - t0

    g = fit_gaussians(train.x.numpy(), train.y.numpy())
    (md_in, rmd_in), (md_ood, rmd_ood) = (mahalanobis_scores(g, x.numpy()) for x in (x_in, x_ood))
    recipe, lr_grid = probe.recipe_from_args(args, d.real)
    head, fit, fit_rows = probe.fit_linear_head(d, model, model_key, train, len(train.classes),
                                                recipe, lr_grid, args.val_fraction, args.seed,
                                                args.workers)
    raw = {"mahalanobis": (md_in, md_ood), "relative_mahalanobis": (rmd_in, rmd_ood),
           "msp": (msp_scores(head, x_in), msp_scores(head, x_ood))}
    scores = {name: ood_metrics(*pair) for name, pair in raw.items()}
    with torch.no_grad():
        head_top1 = probe.topk_accuracy(head(x_in), test.y, ks=(1,))[1]
    name = result_name("ood", d, recipe=args.recipe)
    ood_name = folder_name(d.folders["ood"]) if d.real else "builtin_heldout_shapes"
    if d.real:
        name = name.replace(f"ood_{d.name}", f"ood_{d.name}_vs_{ood_name}", 1)
    result = dict(
        ckpt=args.ckpt, random_init=args.random_init, seed=args.seed, model_hash=model_key[:16],
        dataset=d.name, ood_dataset=ood_name, data="folder" if d.real else "builtin",
        folders=d.folders or None, data_seed=None if d.real else d.data_seed,
        sizes=dict(in_train=len(train.x), in_test=len(x_in), ood=len(x_ood),
                   head_fit=len(fit_rows)),
        classes=len(train.classes),
        convention="positive = in-distribution; scores higher = more OOD; metrics in %",
        scores=scores,
        msp_head=dict(test_top1=head_top1, recipe=fit["recipe"], selection=fit.get("selection")),
        skipped=dict(train=train.skipped, test=test.skipped, ood=out_split.skipped),
        pretraining=pretraining_info(ckpt),
        seconds=dict(features=round(t_features, 1), total=round(time.perf_counter() - t0, 1)),
    )
    out = out_path_for(args.ckpt, args.out, args.preset, args.random_init, name)
    out = write_result(result, out, d.run_dir)
    picture = histograms_png(raw, scores, d.name, ood_name, out, d.run_dir)
    who = "random-init encoder" if args.random_init else args.ckpt
    print(f"{who}: OOD detection, {len(x_in)} in-distribution ({d.name}) vs {len(x_ood)} OOD test "
          f"samples (fit on {len(train.x)}; MSP head base lr {fit['recipe']['base_lr']:g}, test "
          f"top-1 {head_top1:.2f}%) -> {out}, {picture}")
    print(f"  {'score':<22}{'AUROC':>8}{'FPR@95':>8}{'AUPR-in':>9}{'AUPR-out':>9}")
    for score, m in scores.items():
        print(f"  {score:<22}{m['auroc']:8.2f}{m['fpr95']:8.2f}{m['aupr_in']:9.2f}"
              f"{m['aupr_out']:9.2f}")
    return result


if __name__ == "__main__":
    main()
