"""Zero-shot classification by caption likelihood (issue #27): no head, no labels, no training.

    python zeroshot.py --ckpt runs/default/ckpt.pt                   # built-in test split, shapes
    python zeroshot.py --ckpt runs/default/ckpt.pt --label colour    # ... its colours
    python zeroshot.py --ckpt ckpt.pt --test-dir fashion_mnist/test [--names names.txt]
                       [--templates templates.txt]

An M3AE has no contrastive head, but its decoder predicts masked caption words from the image. So:
  * one caption per (template, class name): the template with {} replaced by the name, e.g.
    "a black and white picture of a {}" -> "a black and white picture of a ankle boot";
  * the encoder sees every image patch and every caption token but the name's (exactly the name's
    tokens in context: tokenizer.encode_with_span); the decoder predicts them, and CE(image,
    template, name) is the mean cross-entropy of the name's tokens from the text head;
  * score(image, class) = the mean over templates of the mean over the class's names (synonyms) of
    CE(image, template, name): every template weighs the same, and within a template every name of
    the class (score_weights); the prediction is the class of lowest score, top-5 the 5 lowest;
  * "prior removed": each CE minus the same caption's CE without the image (images=None, the model's
    text-only mode), before averaging (after is the same: the averages are linear). What is left is
    what the image adds to the choice; the text-only prior alone predicts one class for every image;
  * shared forwards: the masked ids never enter the model, so captions of one template whose other
    tokens are the same (names of the same token count, in practice) give the encoder and the
    decoder the same input. One forward per (image batch, template, such group) gives the logits of
    every name in it (caption_groups).
Classes: the built-in test split's shapes or colours (their caption synonyms as names, built-in
templates in the captions' style), or --test-dir's class folders (underscores read as spaces;
--names gives each folder one or more names). Writes zeroshot_<dataset>[_<templates file>].json
(top-1, top-5, per class, the confusion matrix, for both scorings; never a NaN) and a .png of the
confusion matrix next to the checkpoint, both listed in its outputs.txt. Notes and measurements:
docs/zeroshot.md.
"""

import os
import time
from collections import Counter
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import builtin
import data
import plots
from checkpoint import (NORMS, CheckpointError, checkpoint_data_level, checkpoint_data_seed,
                        checkpoint_norm, checkpoint_tokenizer, pretraining_info)
from evalcommon import (add_label_arg, builtin_name, check_file, check_image_folder, check_label,
                        check_output, die, fail, folder_name, out_path_for, read_model, run_folder,
                        skip_report, stratified_pick, write_output, write_result)
from probe import topk_accuracy
from util import make_parser, mix_seed

# Templates in plain English for any folder of photos (one {} for the name). No final full stop: a
# tokenizer trained on captions without one (train.py's default) reads "." as unknown.
DEFAULT_TEMPLATES = ("a photo of a {}", "a black and white picture of a {}",
                     "a close-up photo of the {}", "the {} on a plain background")
# The built-in captions (builtin._caption) begin "<colour> <shape>"; 10% omit the colour and 15% say
# "shape", "object", "thing" or "figure" instead of the shape's name.
BUILTIN_TEMPLATES = {"shape": ("{}", "{}, small", "{}, large", "{} alone"),
                     "colour": ("{} shape", "{} object", "{} thing", "{} figure")}


# -----------------------------------------------------------------------------
# command line


def build_parser():
    p = make_parser(__doc__, prog="zeroshot.py")
    a = p.add_argument
    a("--ckpt", required=True, help="an M3AE checkpoint with text (train.py, convert.py)")
    a("--test-dir", help="ImageFolder root (one sub-folder of images per class); if not given, the "
      "built-in test split")
    a("--names", metavar="FILE", help="class names, one line per class folder: 'folder: name1, "
      "name2' (several names are synonyms, averaged); a folder not listed is named after itself, "
      "underscores as spaces")
    a("--templates", metavar="FILE", help="caption templates, one per line, {} where the name "
      "goes; if not given, DEFAULT_TEMPLATES (the built-in data: BUILTIN_TEMPLATES)")
    add_label_arg(p)
    a("--tokenizer", help="a tokenizer file (sentencepiece .model or BERT vocab.txt) when the "
      "checkpoint carries none (convert.py without --tokenizer)")
    a("--test-size", type=int, help="images; if not given, all (built-in: the split's 2000). On a "
      "folder a seeded stratified subset (--data-seed)")
    a("--data-seed", type=int, help="built-in data: which procedural dataset, if not given the "
      "checkpoint's; folders: which --test-size subset, if not given 0")
    a("--norm", default="auto", choices=["auto", *NORMS], help="normalisation statistics; auto = "
      "those the checkpoint was pretrained with")
    a("--crop-pct", type=float, help="centre crop; if not given, 0.875 for folders (as probe.py), "
      "1.0 for built-in")
    a("--batch-size", type=int, default=256, help="images per forward")
    a("--workers", type=int, default=0, help="DataLoader workers")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    a("--out", help="JSON result path (the PNG beside it); if not given, next to the checkpoint")
    return p


def read_lines(p, flag, path):
    """The non-blank lines of a text file that do not start with '#', stripped."""
    check_file(p, flag, path, "a text file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [x.strip() for x in f]
    except (OSError, UnicodeDecodeError) as e:
        fail(p, flag, path, f"cannot be read as UTF-8 text ({e})")
    lines = [x for x in lines if x and not x.startswith("#")]
    if not lines:
        fail(p, flag, path, "has no line (blank lines and lines starting with # are skipped)")
    return lines


def read_templates(p, path):
    templates = read_lines(p, "--templates", path)
    for i, t in enumerate(templates):
        if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
            fail(p, "--templates", path, f"template {i + 1} {t!r} must hold {{}} once (where the "
                 "class name goes) and no other brace")
    if len(set(templates)) < len(templates):
        fail(p, "--templates", path, "a template is listed twice (it would weigh double)")
    return templates


def read_names(p, path, folders):
    """{folder: [names]} from a --names file; folders it does not list keep their own name."""
    names = {}
    for line in read_lines(p, "--names", path):
        folder, colon, rest = line.partition(":")
        folder, listed = folder.strip(), [n.strip() for n in rest.split(",")]
        if not colon or not all(listed):
            fail(p, "--names", path, f"line {line!r}: expected 'folder: name1, name2' (no empty "
                 "name)")
        if folder not in folders:
            fail(p, "--names", path, f"line {line!r}: no class folder {folder!r} in --test-dir "
                 f"(folders: {', '.join(folders)})")
        if folder in names:
            fail(p, "--names", path, f"folder {folder!r} is listed twice")
        if len(set(listed)) < len(listed):
            fail(p, "--names", path, f"line {line!r}: a name is listed twice")
        names[folder] = listed
    return {f: names.get(f, [folder_to_name(f)]) for f in folders}


def folder_to_name(folder):
    """A class folder's name as a caption would say it: underscores as spaces, spaces squeezed."""
    return " ".join(folder.replace("_", " ").split())


def get_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_file(p, "--ckpt", args.ckpt, "a checkpoint from train.py or convert.py")
    if args.tokenizer:
        check_file(p, "--tokenizer", args.tokenizer, "a sentencepiece .model or a vocab.txt")
    check_output(p, "--out", args.out, "json")
    check_label(p, args)
    if args.test_dir:
        folders, counts = check_image_folder(p, "--test-dir", args.test_dir)
        folders = [f for f in folders if counts[f]]
        if len(folders) < 2:
            fail(p, "--test-dir", args.test_dir, "zero-shot classification needs at least 2 class "
                 "folders with images")
        if args.test_size is not None and args.test_size > sum(counts.values()):
            fail(p, "--test-size", args.test_size, f"more than the {sum(counts.values())} images "
                 "in --test-dir")
        args.class_folders = folders
        args.class_names = (read_names(p, args.names, folders) if args.names
                            else {f: [folder_to_name(f)] for f in folders})
    elif args.names:
        p.error("--names names the class folders of --test-dir (the built-in classes are named by "
                "their caption words)")
    if args.test_size is not None and args.test_size < 1:
        fail(p, "--test-size", args.test_size, "must be >= 1")
    if args.batch_size < 1:
        fail(p, "--batch-size", args.batch_size, "must be >= 1")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        fail(p, "--crop-pct", args.crop_pct, "must be in (0, 1]")
    args.template_list = (read_templates(p, args.templates) if args.templates
                          else list(DEFAULT_TEMPLATES if args.test_dir
                                    else BUILTIN_TEMPLATES[args.label]))
    return args


# -----------------------------------------------------------------------------
# captions: one per (template, name), grouped by shared input


class Caption(NamedTuple):
    """One scored caption: template t, class c, name (a synonym of c), its ids (T,) and padding
    mask (T,) as tokenizer.encode gives them, and the name's token span (start, end)."""
    t: int
    c: int
    name: str
    ids: torch.Tensor
    pad: torch.Tensor
    span: tuple


def make_captions(tokenizer, templates, class_names, text_len):
    """Every (template, class, name) caption with its name's token span, template by template,
    class by class. A name whose tokens the template cannot hold apart (see
    tokenizer.encode_with_span), or that text_len cuts: ValueError naming both."""
    out = []
    for t, template in enumerate(templates):
        at = template.index("{}")
        for c, names in enumerate(class_names):
            for name in names:
                text = template.format(name)
                try:
                    ids, pad, span = tokenizer.encode_with_span(text, name, text_len, at=at)
                except ValueError as e:
                    raise ValueError(f"template {template!r}, name {name!r}: {e}") from None
                out.append(Caption(t, c, name, ids, pad, span))
    return out


def visible_text(cap):
    """(T,) bool, True = the encoder sees it: the caption's tokens but the name's (padding
    hidden)."""
    visible = ~cap.pad
    visible[cap.span[0]: cap.span[1]] = False
    return visible


def caption_groups(captions):
    """[(index of every caption in the group)]: captions whose model input is the same, i.e. the
    same visible tokens at the same places and the same span to predict (the name's ids, hidden,
    are all that differ). In one template, names of the same token count, unless a name changes how
    the rest of the caption tokenizes."""
    groups = {}
    for i, cap in enumerate(captions):
        visible = visible_text(cap)
        key = (cap.t, cap.span, tuple(cap.pad.tolist()), tuple(cap.ids[visible].tolist()))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def score_weights(captions, num_classes):
    """(captions, classes) float64 W with score = CE @ W: caption (t, c, name) weighs 1 / (number
    of templates x number of names of c), so a class's score is the mean over templates of the mean
    over its names."""
    W = torch.zeros(len(captions), num_classes, dtype=torch.float64)
    per_class = Counter(cap.c for cap in captions)  # templates x names of the class
    for i, cap in enumerate(captions):
        W[i, cap.c] = 1.0 / per_class[cap.c]
    return W


# -----------------------------------------------------------------------------
# the model: every patch visible, the name's tokens predicted


@torch.no_grad()
def name_ce(model, images, captions, group):
    """(B, len(group)) float32: each caption's mean cross-entropy of its name's tokens, from one
    forward of the batch `images` (B, 3, H, W) (None: the text-only prior, B = 1) with the group's
    shared input: every patch visible, the caption's other tokens visible."""
    first = captions[group[0]]
    device = model.cls_token.device
    B = 1 if images is None else images.size(0)
    text = first.ids[None].expand(B, -1).to(device)  # the name's ids are hidden: any member's do
    pad = first.pad[None].expand(B, -1).to(device)
    text_visible = visible_text(first)[None].expand(B, -1).to(device)
    image_visible = (None if images is None else
                     torch.ones(B, model.config.num_patches, dtype=torch.bool, device=device))
    enc = model.forward_encoder(images, text, pad, image_visible=image_visible,
                                text_visible=text_visible)
    _, x_txt = model.decode(enc)  # (B, T, Dd)
    start, end = first.span
    logp = F.log_softmax(model.text_head(x_txt[:, start:end]), dim=-1, dtype=torch.float32)
    names = torch.stack([captions[i].ids[start:end] for i in group]).to(device)  # (G, L)
    ce = -logp[:, torch.arange(end - start, device=device)[None], names]  # (B, G, L)
    return ce.mean(-1)


def score_captions(model, loader, captions, groups, desc="zero-shot"):
    """(CE (N images, captions) float32, labels (N,), skipped {reason: count}) over the loader."""
    ces, labels, skipped = [], [], Counter()
    device = model.cls_token.device
    for batch in tqdm(loader, desc=desc, leave=False, disable=len(loader) < 4):
        skipped.update({k: n for k, n in batch["skipped"].items()
                        if not k.startswith("converted:")})
        if not len(batch["label"]):
            continue
        images = batch["image"].to(device)
        ce = torch.zeros(len(images), len(captions))
        for group in groups:
            ce[:, group] = name_ce(model, images, captions, group).float().cpu()
        ces.append(ce)
        labels.append(batch["label"])
    if not ces:
        return torch.zeros(0, len(captions)), torch.zeros(0, dtype=torch.int64), dict(skipped)
    return torch.cat(ces), torch.cat(labels), dict(skipped)


def text_prior(model, captions, groups):
    """(captions,) float32: each caption's name CE with no image (the text-only mode)."""
    prior = torch.zeros(len(captions))
    for group in groups:
        prior[group] = name_ce(model, None, captions, group)[0].float().cpu()
    return prior


def metrics(scores, labels, class_names):
    """Top-1 / top-5 (lowest score first), per-class top-1 and the confusion matrix (row = true,
    column = predicted) of scores (N, C), lower = more likely."""
    C = scores.size(1)
    acc = topk_accuracy(-scores, labels)
    pred = scores.argmin(1)
    confusion = torch.zeros(C, C, dtype=torch.int64)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = {}
    for c, name in enumerate(class_names):
        n = int(confusion[c].sum())
        per_class[name] = round(100.0 * int(confusion[c, c]) / n, 2) if n else None
    return dict(top1=acc[1], top5=acc[5], per_class_top1=per_class,
                predicted_share={name: round(100.0 * int((pred == c).sum()) / len(pred), 2)
                                 for c, name in enumerate(class_names)},
                confusion=confusion.tolist())


# -----------------------------------------------------------------------------
# data


def test_source(args, ckpt, image_size):
    """(source of dict(image, label), class names (the folders' or the built-in labels'), names per
    class, what, data info for the JSON)."""
    if args.test_dir:
        source = data.ImageFolder(args.test_dir, args.class_folders)
        if args.test_size is not None and args.test_size < len(source):
            labels = [k for _, k in source.samples]
            picked = stratified_pick(labels, args.test_size, mix_seed(args.data_seed or 0, 23))
            source = torch.utils.data.Subset(source, picked.tolist())
        classes = list(args.class_folders)
        names = [args.class_names[f] for f in classes]
        return source, classes, names, f"--test-dir {args.test_dir}", dict(
            data="folder", folders=dict(test=args.test_dir), dataset=folder_name(args.test_dir))
    seed = args.data_seed if args.data_seed is not None else checkpoint_data_seed(ckpt)
    level = checkpoint_data_level(ckpt)
    source = builtin.Builtin("test", args.test_size, image_size, seed=seed, level=level,
                             label=args.label)
    if args.label == "shape":
        names = [list(builtin.SHAPE_WORDS[c]) for c in source.classes]
    else:
        names = [list(builtin.COLOURS[c][0]) for c in source.classes]
    return source, list(source.classes), names, "built-in test split", dict(
        data="builtin", folders=None, dataset=builtin_name(args.label), data_seed=seed,
        data_level=level,
        label=args.label)


# -----------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    t0 = time.perf_counter()
    try:
        model, ckpt = read_model(args.ckpt)
    except CheckpointError as e:
        die("zeroshot.py", f"--ckpt {e}")
    if ckpt.get("args", {}).get("no_text") or model.config.text_loss_weight == 0:
        die("zeroshot.py", f"--ckpt {args.ckpt}: trained without text (an MAE baseline: no_text), "
            "so its text head never learned to predict words; zero-shot by caption likelihood "
            "needs an M3AE checkpoint")
    try:
        tokenizer = checkpoint_tokenizer(ckpt, args.ckpt, args.tokenizer)
    except ValueError as e:
        die("zeroshot.py", f"--ckpt {args.ckpt}: {' '.join(str(e).split())}")
    model = model.to(args.device).eval()
    c = model.config
    source, classes, class_names, what, info = test_source(args, ckpt, c.image_size)
    templates = args.template_list
    try:
        captions = make_captions(tokenizer, templates, class_names, c.text_len)
    except ValueError as e:
        die("zeroshot.py", " ".join(str(e).split()))
    groups = caption_groups(captions)
    W = score_weights(captions, len(classes))

    if args.norm == "auto":
        mean, std = checkpoint_norm(ckpt, real_data_default=bool(args.test_dir))
    else:
        mean, std = NORMS[args.norm]
    crop = args.crop_pct if args.crop_pct is not None else (0.875 if args.test_dir else 1.0)
    view = data.EvalTransform(c.image_size, mean, std, crop)
    loader = torch.utils.data.DataLoader(data.LabelledDataset(source, view),
                                         batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=data.collate)
    ce, labels, skipped = score_captions(model, loader, captions, groups)
    if len(labels) == 0:
        die("zeroshot.py", f"{what}: no usable image: all {len(source)} skipped "
            f"({skip_report(skipped)}); no metric computed")
    prior = text_prior(model, captions, groups)
    if not (torch.isfinite(ce).all() and torch.isfinite(prior).all()):
        raise SystemExit("a caption's cross-entropy is not finite (NaN or inf weights?); no result")
    scores = (ce.double() @ W).float()  # (N, C)
    prior_scores = (prior.double() @ W).float()  # (C,)
    with_image = metrics(scores, labels, classes)
    removed = metrics(scores - prior_scores, labels, classes)
    prior_only = int(prior_scores.argmin())
    seconds = round(time.perf_counter() - t0, 1)
    C, N = len(classes), len(labels)
    present = labels.bincount(minlength=C)
    result = dict(
        ckpt=args.ckpt, dataset=info["dataset"], data=info["data"], folders=info["folders"],
        **{k: info[k] for k in ("data_seed", "data_level", "label") if k in info},
        classes=C, class_names=classes, names=dict(zip(classes, class_names)),
        templates=templates, test_size=N, chance_top1=100.0 / C,
        majority_share=100.0 * int(present.max()) / N,
        scoring=dict(
            caption="each template with {} replaced by each name of each class",
            visible="every image patch; every caption token but the name's (padding hidden)",
            ce="mean cross-entropy of the name's tokens from the text head (natural log)",
            score="mean over templates of the mean over the class's names of ce; lowest wins",
            prior_removed="ce minus the same caption's ce with no image (text-only mode), per "
                          "caption before averaging"),
        top1=with_image["top1"], top5=with_image["top5"],
        prior_removed_top1=removed["top1"], prior_removed_top5=removed["top5"],
        with_image=with_image, prior_removed=removed,
        text_only_prior=dict(scores={k: round(float(v), 4) for k, v in zip(classes, prior_scores)},
                             predicts=classes[prior_only],
                             top1=100.0 * int((labels == prior_only).sum()) / N),
        forwards=dict(captions=len(captions), groups=len(groups), batches=len(loader),
                      per_batch=len(groups), unshared_per_batch=len(captions)),
        crop_pct=crop, norm=dict(mean=list(mean), std=list(std)), skipped=skipped,
        tokenizer=tokenizer.kind, pretraining=pretraining_info(ckpt), seconds=seconds)
    name = "zeroshot_" + info["dataset"]
    if args.templates:
        name += "_" + folder_name(os.path.splitext(os.path.basename(args.templates))[0])
    run_dir = run_folder(args.ckpt, None)
    out = write_result(result, out_path_for(args.ckpt, args.out, None, False, name), run_dir)
    png = os.path.splitext(out)[0] + ".png"
    title = (f"zero-shot on {info['dataset']}: top-1 {with_image['top1']:.1f}% "
             f"(chance {100.0 / C:.1f}%)")
    img = plots.confusion_matrix(torch.tensor(with_image["confusion"]), classes, title)
    try:
        write_output(png, lambda f: img.save(f, format="PNG"), "png", folder=run_dir)
    except OSError as e:
        print(f"note: {png} not written: {e.strerror or e}")
    print(f"{args.ckpt} on {info['dataset']}: zero-shot top-1 {with_image['top1']:.2f}% top-5 "
          f"{with_image['top5']:.2f}% (chance {100.0 / C:.2f}%) | text-only prior removed: top-1 "
          f"{removed['top1']:.2f}% top-5 {removed['top5']:.2f}% | prior alone: "
          f"{result['text_only_prior']['top1']:.2f}% | {N} images, {C} classes, {len(templates)} "
          f"templates, {len(captions)} captions in {len(groups)} forwards per batch, {seconds}s "
          f"-> {out}, {png}")
    return result


if __name__ == "__main__":
    main()
