"""finetune.py: layer-wise lr decay against mae's formula, mixup / cutmix targets, drop path, the
augmentations, exact resume, the bad inputs probe.py refuses, a converted official checkpoint."""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import convert
import finetune
from checkpoint import checkpoint_dict, load_model
from model import M3AE, Block, drop_path, make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "official_m3ae_tiny.npz")
# a few steps of the built-in data: 2 epochs of 2 batches of 16, scored on 16 test images
SMALL = ["--train-size", "40", "--test-size", "16", "--epochs", "2", "--batch-size", "16",
         "--workers", "0", "--log-every", "1", "--batch-size-features", "16"]


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = M3AE(make_config("tiny", vocab_size=50, depth=2))
    path = tmp_path / "run" / "ckpt.pt"
    path.parent.mkdir()
    torch.save(checkpoint_dict(model, args={"data": "builtin", "data_seed": 0, "steps": 0}), path)
    return path


def class_folders(root, classes, n=4, size=16):
    """root/<class>/<i>.png: small real PNGs, a colour per class."""
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (size, size), (60 * k % 255, 20 * i % 255, 160)).save(
                root / c / f"{i}.png")
    return root


# --- the recipe's pieces --------------------------------------------------------------------------


def test_layer_decay_groups_follow_maes_formula():
    depth, decay = 3, 0.65
    net = finetune.Classifier(M3AE(make_config("tiny", vocab_size=50, depth=depth)), 7)
    groups = finetune.layer_decay_groups(net, 0.05, decay)
    names = {id(p): n for n, p in net.named_parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            seen.add(name)
            # mae's get_layer_id_for_vit, on our names
            if name.startswith(("m3ae.patch_embed", "m3ae.cls_token", "m3ae.enc_image_type")):
                lid = 0
            elif name.startswith("m3ae.encoder.blocks."):
                lid = int(name.split(".")[3]) + 1
            else:
                lid = depth + 1
            assert g["layer_id"] == lid, name
            assert g["lr_scale"] == pytest.approx(decay ** (depth + 1 - lid)), name  # mae's scale
            matrix = p.ndim == 2 and name.endswith(".weight") and "norm" not in name
            assert g["weight_decay"] == (0.05 if matrix else 0.0), name
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert seen == trained  # every trained parameter in exactly one group ...
    assert sum(len(g["params"]) for g in groups) == len(trained)
    # ... and only the image encoder and the head train (global pool: not the encoder's final norm)
    frozen = ("m3ae.decoder", "m3ae.text_", "m3ae.encoder.norm")
    assert not any(n.startswith(frozen) for n in trained)
    assert {"head.weight", "fc_norm.weight", "m3ae.patch_embed.weight", "m3ae.cls_token"} <= trained
    scales = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert scales[depth + 1] == 1.0 and scales[0] == pytest.approx(decay ** (depth + 1))
    cls = finetune.Classifier(M3AE(make_config("tiny", vocab_size=50, depth=depth)), 7, False)
    assert cls.m3ae.encoder.norm.weight.requires_grad and cls.fc_norm is None  # the CLS feature


def test_layer_decay_scales_each_groups_lr_in_a_step():
    net = finetune.Classifier(M3AE(make_config("tiny", vocab_size=50, depth=2)), 3)
    opt = torch.optim.AdamW(finetune.layer_decay_groups(net, 0.0, 0.5), lr=0.0)
    t = finetune.Training(net, net, opt)
    args = finetune.build_parser().parse_args(["--random-init"])
    env = finetune.setup("cpu")
    batch = dict(image=torch.randn(4, 3, 32, 32), label=torch.tensor([0, 1, 2, 0]))
    finetune.train_step(t, batch, 1e-3, env, args, 3)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([1e-3 * 0.5**3, 1e-3 * 0.25,
                                                                          1e-3 * 0.5, 1e-3])


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_mixed_targets_sum_to_one_and_cutmix_weighs_the_pasted_area(mixup, cutmix):
    B, C, H = 8, 10, 32
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, H, H).contiguous()
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])  # sample i: pixels all i, label i
    for seed in range(20):
        rng = np.random.default_rng(seed)
        out, t, lam, box = finetune.mix_batch(x, y, C, rng, mixup, cutmix, smoothing=0.1)
        assert torch.allclose(t.sum(1), torch.ones(B)) and (t >= 0).all()
        assert torch.equal(x[:, 0, 0, 0], torch.arange(B, dtype=torch.float32))  # input untouched
        partner = y.flip(0)
        own_w, partner_w = t[torch.arange(B), y], t[torch.arange(B), partner]
        if box is not None:  # cutmix: the partner's weight is the share of pixels pasted from it
            assert cutmix > 0
            pasted = (out[:, 0] == partner[:, None, None].float()).float().mean((1, 2))
            pasted[y == partner] = 0  # (no self-pairs with B even)
            assert torch.allclose(1 - lam * torch.ones(B), pasted, atol=1e-6)
            assert torch.allclose(partner_w - 0.01, 0.9 * pasted, atol=1e-6)
        elif lam < 1:  # mixup: the pixels and the targets blend by the same lam
            assert mixup > 0
            assert torch.allclose(out[:, 0, 0, 0], lam * y.float() + (1 - lam) * partner.float(),
                                  atol=1e-5)
            assert torch.allclose(own_w, torch.full((B,), 0.9 * lam + 0.01), atol=1e-6)
        else:
            assert mixup == cutmix == 0 and torch.equal(out, x)
            assert torch.allclose(own_w, torch.full((B,), 0.91))  # smoothing alone
    assert torch.allclose(finetune.soft_targets(y, C, 0.0), torch.eye(C)[y])


def test_drop_path_is_the_identity_at_eval_and_at_rate_0_and_unbiased_in_training():
    x = torch.randn(4000, 3, 8)
    assert drop_path(x, 0.3, training=False) is x and drop_path(x, 0.0, training=True) is x
    torch.manual_seed(0)
    y = drop_path(x, 0.3, training=True)
    kept = (y != 0).flatten(1).all(1)
    assert ((y[~kept] == 0).all() and torch.allclose(y[kept], x[kept] / 0.7))  # whole samples
    assert abs(kept.float().mean().item() - 0.7) < 0.03
    block = Block(8, 2, 4.0, 1e-6, "tanh", drop_path=0.5)
    plain = Block(8, 2, 4.0, 1e-6, "tanh")
    plain.load_state_dict(block.state_dict())
    block.eval()
    assert torch.equal(block(x[:5]), plain(x[:5]))  # eval mode: the identity
    # the config's rate rises linearly over the encoder blocks, 0 at the first; the decoder has none
    model = M3AE(make_config("tiny", vocab_size=50, depth=3, drop_path_rate=0.2))
    assert [b.drop_path for b in model.encoder.blocks] == pytest.approx([0.0, 0.1, 0.2])
    assert all(b.drop_path == 0 for b in model.decoder.blocks)
    assert all(b.drop_path == 0 for b in M3AE(make_config("tiny", vocab_size=50)).encoder.blocks)


def test_augmentations_keep_shape_and_are_seeded():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    for name, op in finetune.RAND_OPS.items():
        for m in (0.0, 0.9, 1.0):
            out = op(img, m)
            assert out.size == img.size and out.mode == "RGB", name
    args = finetune.build_parser().parse_args(["--random-init"])
    view = finetune.TrainTransform(32, (0.5,) * 3, (0.25,) * 3, args)
    torch.manual_seed(3)
    a = view(img)
    torch.manual_seed(3)
    assert a.shape == (3, 32, 32) and torch.equal(a, view(img))
    x = torch.zeros(3, 32, 32)
    torch.manual_seed(0)
    erased = [finetune.random_erase(x, 1.0) for _ in range(50)]
    shares = [(e != 0).any(0).float().mean().item() for e in erased]
    assert all(0.015 < s < 0.36 for s in shares)  # one box of 2%-33% of the area
    assert finetune.random_erase(x, 0.0) is x


def test_the_feature_global_pool_is_maes_mean_before_the_final_norm():
    m3ae = M3AE(make_config("tiny", vocab_size=50, depth=2)).eval()
    net = finetune.Classifier(m3ae, 5).eval()
    images = torch.randn(3, 3, 32, 32)
    cls, tokens = m3ae.encode(images)
    with torch.no_grad():
        x = torch.cat([m3ae.cls_token.expand(3, -1, -1), m3ae.embed_image(images)], 1)
        for b in m3ae.encoder.blocks:
            x = b(x)
        assert torch.allclose(m3ae.encoder.norm(x[:, 1:]), tokens, atol=1e-5)  # encode's tokens
        expect = net.head(net.fc_norm(x[:, 1:].mean(1)))
        assert torch.allclose(net(images), expect, atol=1e-6)
        cls_net = finetune.Classifier(m3ae, 5, global_pool=False).eval()
        assert torch.allclose(cls_net(images), cls_net.head(cls), atol=1e-5)  # probe.py's feature


# --- the script ----------------------------------------------------------------------------------


def run(argv, tmp_path, name):
    out = tmp_path / f"{name}.json"
    return finetune.main([*argv, "--out-dir", str(tmp_path / name), "--out", str(out)]), out


def test_end_to_end_writes_the_result_the_run_and_refuses_a_second_run(tmp_path, ckpt, capsys):
    r = finetune.main(["--ckpt", str(ckpt), *SMALL])
    out = ckpt.parent / "finetune_builtin.json"
    assert json.loads(out.read_text())["top1"] == r["top1"] and r["steps"] == 4
    assert r["classes"] == 10 and r["top5"] is not None and r["test_size"] == 16
    assert "finetune_builtin.json" in (ckpt.parent / "outputs.txt").read_text()
    run_dir = ckpt.parent / "finetune_builtin"
    assert {"ckpt.pt", "log.jsonl", "curves.png", "config.json"} <= set(os.listdir(run_dir))
    assert "done: fine-tuned 2 epochs (4 steps)" in capsys.readouterr().out
    model, saved = load_model(str(run_dir / "ckpt.pt"))  # the fine-tuned encoder, as probe.py reads
    assert model.config.drop_path_rate == 0.1 and set(saved["head"]) == {
        "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    with pytest.raises(SystemExit) as e:  # one run per out-dir
        finetune.main(["--ckpt", str(ckpt), *SMALL])
    assert e.value.code == 2 and "already holds a run" in capsys.readouterr().err


def test_a_stopped_and_resumed_run_equals_one_run_in_one_go(tmp_path):
    argv = ["--random-init", *SMALL, "--epochs", "3"]
    whole, whole_json = run(argv, tmp_path, "whole")
    stopped, _ = run([*argv, "--stop-after", "3"], tmp_path, "part")  # mid-epoch
    assert stopped is None
    resumed, part_json = run(["--resume"], tmp_path, "part")  # every setting from the run
    a = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["head"]:
        assert torch.equal(a["head"][k], b["head"][k]), k
    assert resumed["top1"] == whole["top1"] and resumed["val_top1"] == whole["val_top1"]
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
                          for line in open(path)]
    assert strip(tmp_path / "part" / "log.jsonl") == strip(tmp_path / "whole" / "log.jsonl")


def test_resume_refuses_a_changed_setting(tmp_path, capsys):
    run(["--random-init", *SMALL, "--stop-after", "1"], tmp_path, "r")
    with pytest.raises(SystemExit) as e:
        run(["--resume", "--mixup", "0.2"], tmp_path, "r")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--mixup 0.8 -> 0.2" in err


def error_line(capsys, argv):
    with pytest.raises(SystemExit) as e:
        finetune.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_the_bad_inputs_probe_refuses_are_refused_in_one_line(tmp_path, capsys, ckpt):
    good = class_folders(tmp_path / "good", ["a", "b"])
    one = class_folders(tmp_path / "one", ["cat"])
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 20)
    base = ["--ckpt", str(ckpt)]
    cases = [
        (["--ckpt", str(tmp_path / "nope.pt")], "--ckpt", "no such file"),
        (base + ["--train-dir", str(tmp_path / "missing"), "--test-dir", str(good)],
         "--train-dir", "no such folder"),
        (base + ["--train-dir", str(empty), "--test-dir", str(good)], "--train-dir",
         "no class sub-folders"),
        (base + ["--train-dir", str(one), "--test-dir", str(one)], "--train-dir",
         "at least 2 classes"),
        (base + ["--train-dir", str(good), "--test-dir", str(good), "--val-dir", str(empty)],
         "--val-dir", "no class sub-folders"),
        (base + ["--mixup", "-1"], "--mixup", "must be"),
        (base + ["--layer-decay", "0"], "--layer-decay", "must be in (0, 1]"),
        (base + ["--train-dir", str(good), "--test-dir", str(good), "--label", "colour"], "--label",
         "folders label by class folder"),
    ]
    for argv, flag, problem in cases:
        line = error_line(capsys, argv + ["--out-dir", str(tmp_path / "ft")])
        assert flag in line and problem in line, (line, flag, problem)
    line = error_line(capsys, ["--ckpt", str(garbage), *SMALL, "--out-dir", str(tmp_path / "ft")])
    assert line.startswith("finetune.py: error: --ckpt") and str(garbage) in line
    # two class folders, every image of one unreadable: refused in one line after reading
    two = class_folders(tmp_path / "two", ["cat", "dog"])
    for f in (two / "dog").iterdir():
        f.write_bytes(b"not a png")
    line = error_line(capsys, base + ["--train-dir", str(two), "--test-dir", str(two),
                                      "--out-dir", str(tmp_path / "ft")])
    assert "at least 2 classes" in line
    assert not (tmp_path / "ft").exists()  # nothing written


def test_folders_fine_tune_with_a_validation_split(tmp_path, ckpt):
    train = class_folders(tmp_path / "data" / "train", ["a", "b", "c"], n=8)
    test = class_folders(tmp_path / "data" / "test", ["a", "b", "c"], n=2)
    r, out = run(["--ckpt", str(ckpt), "--train-dir", str(train), "--test-dir", str(test),
                  "--epochs", "1", "--batch-size", "8", "--workers", "0", "--val-fraction",
                  "0.25"], tmp_path, "folders")
    assert r["dataset"] == "data" and r["classes"] == 3 and r["top5"] is None  # 3 classes: no top-5
    assert r["val_size"] == 6 and r["test_size"] == 6 and json.loads(out.read_text())["top1"] >= 0


def test_a_converted_official_checkpoint_fine_tunes(tmp_path):
    ours = tmp_path / "converted" / "ckpt.pt"
    ours.parent.mkdir()
    assert convert.main(["official", FIXTURE, str(ours)]) == 0
    r, _ = run(["--ckpt", str(ours), *SMALL, "--epochs", "1"], tmp_path, "official")
    assert r["steps"] == 2 and math.isfinite(r["top1"])
    model, saved = load_model(str(tmp_path / "official" / "ckpt.pt"))
    assert model.config.emb_dim == 64 and saved["head"]["head.weight"].shape == (10, 64)


# --- the systems paths: bf16 autocast and torch.compile (CPU here; CUDA picks both by default),
# torchrun DDP (two gloo ranks on CPU)

PLAIN = ["--mixup", "0", "--cutmix", "0", "--drop-path", "0"]  # no per-rank randomness


def first_loss(run_dir):
    return next(json.loads(line)["loss"] for line in open(run_dir / "log.jsonl"))


def test_bf16_autocast_and_torch_compile_fine_tune_like_eager_fp32(tmp_path):
    """The GPU defaults (bf16 autocast, torch.compile) taken on CPU: the first batch's loss, before
    any update, agrees with eager fp32's to bf16's precision, and the run ends with a finite top-1."""
    argv = ["--random-init", *SMALL, "--epochs", "1", *PLAIN]
    eager, _ = run([*argv, "--dtype", "fp32", "--no-compile"], tmp_path, "eager")
    fast, _ = run([*argv, "--dtype", "bf16", "--compile"], tmp_path, "compiled")
    assert fast["steps"] == eager["steps"] == 2 and math.isfinite(fast["top1"])
    a, b = first_loss(tmp_path / "eager"), first_loss(tmp_path / "compiled")
    assert abs(a - b) < 0.02 * a, (a, b)


def test_ddp_two_gloo_ranks_equal_one_process(tmp_path):
    """torchrun with two ranks: each sees half of every global batch, DDP averages the gradients,
    evaluation is sharded and the counts summed: the same weights and top-1 as one process (without
    mixup and drop path, which draw per rank, as mae's do)."""
    import subprocess
    import sys

    argv = ["--random-init", *SMALL, *PLAIN, "--device", "cpu"]
    one, _ = run(argv, tmp_path, "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "finetune.py"), *argv, "--out-dir", str(tmp_path / "two"), "--out",
           str(tmp_path / "two.json")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and two["steps"] == one["steps"] == 4
    assert two["test_size"] == one["test_size"] == 16 and two["top1"] == one["top1"]
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    for part in ("model", "head"):
        for name in a[part]:
            x, y = a[part][name], b[part][name]
            if name.endswith("attn.qkv.bias"):  # the key bias: see test_train's DDP test
                x, y = torch.cat([x.chunk(3)[0], x.chunk(3)[2]]), torch.cat(
                    [y.chunk(3)[0], y.chunk(3)[2]])
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=name)


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path):
    """SIGKILL after step 3 (the last checkpoint: the end of epoch 1, step 2): --resume replays from
    the checkpoint, drops the log lines it replays, and ends where one run in one go ends."""
    import signal
    import subprocess
    import sys
    import time

    argv = ["--random-init", *SMALL, "--epochs", "3"]
    run(argv, tmp_path, "whole")
    out = tmp_path / "killed"
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); import finetune\n"
            "step = finetune.train_step\n"
            "def slow(t, *a):\n"
            "    if t.step >= 3:\n"
            "        time.sleep(600)\n"
            "    return step(t, *a)\n"
            "finetune.train_step = slow; finetune.main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", code, *argv, "--out-dir", str(out), "--out",
                             str(tmp_path / "killed.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while '"step": 3' not in ((out / "log.jsonl").read_text() if (out / "log.jsonl").exists()
                              else ""):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the run never reached step 3"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    run(["--resume"], tmp_path, "killed")
    a = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)
    b = torch.load(out / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for part in ("model", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    steps = [json.loads(line).get("step") for line in open(out / "log.jsonl")]
    assert steps == [json.loads(line).get("step") for line in open(tmp_path / "whole" /
                                                                     "log.jsonl")]


def test_the_built_in_colour_label_is_its_own_run_and_result(tmp_path, ckpt):
    r = finetune.main(["--ckpt", str(ckpt), *SMALL, "--epochs", "1", "--label", "colour"])
    assert r["classes"] == 11 and r["dataset"] == "builtin_colour"
    assert (ckpt.parent / "finetune_builtin_colour.json").exists()
    assert (ckpt.parent / "finetune_builtin_colour" / "ckpt.pt").exists()
