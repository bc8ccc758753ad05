"""model.py: shapes, masking, losses, modes, attention implementations and the stated conventions."""

import math

import pytest
import torch

from kernels.dispatch import EAGER_TRITON_MIN_SEQ, attention_impl
from model import (PRESETS, M3AE, attention, attention_weights, make_config, num_kept, patch_mse, patchify,
                   per_sample_mean, random_masking, token_ce, unpatchify, visible_masking)

TEXT_PARAMS = {"text_embed.weight", "enc_text_type", "dec_text_type", "text_mask_token", "text_head.weight",
               "text_head.bias"}
IMAGE_PARAMS = {"patch_embed.weight", "patch_embed.bias", "enc_image_type", "dec_image_type", "image_mask_token",
                "image_head.weight", "image_head.bias"}


def tiny(**overrides):
    return make_config("tiny", **{"vocab_size": 50, "attn_impl": "math", **overrides})


def image_loss(pred, target, mask, norm_pix=False):
    """The paper's image term from full predictions (B, N, P) and a mask (1 = removed): the readable formula
    M3AE.forward_loss must equal while it runs the head on the removed patches only."""
    return per_sample_mean(patch_mse(pred, target, norm_pix), mask)


def text_loss(logits, tokens, mask, padding_mask):
    """The paper's text term from full logits (B, T, V): CE on removed, non-padding slots, per sample first."""
    return per_sample_mean(token_ce(logits, tokens), mask * (~padding_mask).float())


def full_predictions(model, *args):
    """Heads on every token, with gradients (M3AE.reconstruct is the same without them)."""
    enc = model.forward_encoder(*args)
    x_img, x_txt = model.decode(enc)
    return dict(image_pred=model.image_head(x_img) if x_img is not None else None,
                text_logits=model.text_head(x_txt) if x_txt is not None else None,
                image_mask=enc.image.mask if enc.image else None, text_mask=enc.text.mask if enc.text else None)


def batch(cfg, B=3, seed=0, lengths=None):
    """Images and captions; caption b has lengths[b] real tokens (ids >= 1) then padding (id 0)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    lengths = lengths if lengths is not None else [cfg.text_len, 5, 0][:B]
    text = torch.randint(1, cfg.vocab_size, (B, cfg.text_len), generator=g)
    pad = torch.arange(cfg.text_len)[None, :] >= torch.tensor(lengths)[:, None]  # True = padding
    return images, text.masked_fill(pad, 0), pad


# --- shapes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(PRESETS))
def test_shapes_every_preset(preset):
    cfg = make_config(preset, attn_impl="sdpa")
    B = 2
    # Only tiny is materialised; the others run on the meta device (shapes without memory or compute).
    device = "cpu" if preset == "tiny" else "meta"
    with torch.device(device):
        model = M3AE(cfg)
        images = torch.randn(B, 3, cfg.image_size, cfg.image_size)
        text = torch.randint(1, cfg.vocab_size, (B, cfg.text_len))
        out = model.reconstruct(images, text)
        enc = model.forward_encoder(images, text)
        cls, tokens = model.encode(images, text)
    N, T = cfg.num_patches, cfg.text_len
    assert enc.x.shape == (B, 1 + num_kept(N, 0.75) + num_kept(T, 0.75), cfg.emb_dim)
    assert out["image_pred"].shape == (B, N, cfg.patch_size**2 * 3)
    assert out["text_logits"].shape == (B, T, cfg.vocab_size)
    assert out["image_mask"].shape == (B, N) and out["text_mask"].shape == (B, T)
    assert cls.shape == (B, cfg.emb_dim) and tokens.shape == (B, N + T, cfg.emb_dim)


def test_presets_match_paper():
    widths = {name: (make_config(name).emb_dim, make_config(name).depth, make_config(name).num_heads)
              for name in ("small", "base", "large", "huge")}
    assert widths == {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16), "huge": (1280, 32, 16)}
    for name in widths:
        c = make_config(name)
        assert (c.dec_emb_dim, c.dec_depth, c.dec_num_heads, c.ln_eps) == (512, 8, 16, 1e-6)
    with pytest.raises(ValueError, match="unknown config fields"):
        make_config("tiny", widht=3)


def test_vit_base_encoder_is_86m():
    from model import count_parameters

    n = count_parameters(make_config("base"))["encoder (ViT image path)"]
    assert 85e6 < n < 87e6


# --- patches and masking -------------------------------------------------------------------------------


def test_patchify_order_and_inverse():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    patches = patchify(images, 2)  # (2, 4, 12)
    # patch 1 is grid row 0, column 1; its first values are pixel (0, 2) channels 0, 1, 2
    assert patches[0, 1, :3].tolist() == [images[0, c, 0, 2].item() for c in range(3)]
    # then pixel (0, 3): (row, col, channel) order
    assert patches[0, 1, 3].item() == images[0, 0, 0, 3].item()
    assert torch.equal(unpatchify(patches, 2), images)


@pytest.mark.parametrize("L,ratio,keep", [(256, 0.75, 64), (64, 0.75, 16), (64, 0.15, 54), (64, 0.9, 6),
                                          (64, 0.5, 32), (10, 0.0, 10), (10, 1.0, 0)])
def test_keep_count_is_floor(L, ratio, keep):
    assert num_kept(L, ratio) == keep
    ids_keep, ids_removed, ids_restore, mask = random_masking(torch.rand(4, L), ratio)
    assert ids_keep.shape == (4, keep) and ids_removed.shape == (4, L - keep)
    assert (mask.sum(dim=1) == L - keep).all()  # mask: 1 = removed


def test_masking_invariants():
    B, L = 8, 64
    noise = torch.rand(B, L)
    ids_keep, ids_removed, ids_restore, mask = random_masking(noise, 0.75)
    shuffle = noise.argsort(dim=1)
    assert torch.equal(shuffle.gather(1, ids_restore), torch.arange(L).expand(B, L))  # ids_restore inverts
    assert (mask.gather(1, ids_keep) == 0).all()  # kept positions are 0 in the mask
    assert torch.equal(ids_keep, shuffle[:, :16])  # the lowest-noise positions are kept, in noise order
    assert len({tuple(row.tolist()) for row in mask}) == B  # different samples, different masks
    again = random_masking(noise.clone(), 0.75)
    assert all(torch.equal(a, b) for a, b in zip(again, (ids_keep, ids_removed, ids_restore, mask)))
    # identical noise rows give the official batch-shared mask
    shared = random_masking(noise[:1].expand(B, L), 0.75).mask
    assert (shared == shared[:1]).all()


def test_removed_ids_are_the_removed_positions():
    B, L = 6, 24
    m = random_masking(torch.rand(B, L), 0.75)
    for b in range(B):  # every removed position once, and the mask says which
        assert sorted(m.ids_removed[b].tolist()) == m.mask[b].nonzero().squeeze(1).tolist()
        assert sorted(m.ids_keep[b].tolist() + m.ids_removed[b].tolist()) == list(range(L))
    assert random_masking(torch.rand(B, L), 0.0).ids_removed.shape == (B, 0)  # nothing to gather


def test_visible_masking_reproduces_the_drawn_mask():
    """An explicit visible-token input (image_visible / text_visible) gives the same forward as the noise that
    draws the same mask: the counts come from the Masking, not from the config's ratio."""
    cfg = tiny()
    model = M3AE(cfg).eval()
    images, text, pad = batch(cfg)
    noise_i, noise_t = torch.rand(3, cfg.num_patches), torch.rand(3, cfg.text_len)
    drawn = model.reconstruct(images, text, pad, noise_i, noise_t)
    given = model.reconstruct(images, text, pad, image_visible=drawn["image_mask"] == 0,
                              text_visible=drawn["text_mask"] == 0)
    for key in ("image_mask", "text_mask"):
        assert torch.equal(drawn[key], given[key])
    for key in ("image_pred", "text_logits"):  # the same tokens visible, in another order: same outputs
        torch.testing.assert_close(drawn[key], given[key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(images, text, pad, noise_i, noise_t)["loss"],
                               model(images, text, pad, image_visible=drawn["image_mask"] == 0,
                                     text_visible=drawn["text_mask"] == 0)["loss"], atol=1e-5, rtol=1e-5)
    # any count, whatever the config's ratio says: all patches and two text slots visible
    vis_t = torch.zeros(3, cfg.text_len, dtype=torch.bool)
    vis_t[:, 3:5] = True
    enc = model.forward_encoder(images, text, pad, image_visible=torch.ones(3, cfg.num_patches, dtype=torch.bool),
                                text_visible=vis_t)
    assert enc.x.shape[1] == 1 + cfg.num_patches + 2 and enc.text.ids_removed.shape == (3, cfg.text_len - 2)
    assert torch.isfinite(model(images, text, pad, image_visible=torch.ones(3, cfg.num_patches, dtype=torch.bool),
                                text_visible=vis_t)["loss"])
    with pytest.raises(ValueError, match="as many tokens"):
        visible_masking(torch.tensor([[True, False], [True, True]]))


def test_text_masking_counts_padding_and_hides_visible_padding():
    cfg = tiny()
    model = M3AE(cfg).eval()
    images, text, pad = batch(cfg)
    enc = model.forward_encoder(images, text, pad)
    # keep = floor(T * 0.25) slots whatever the caption length (padding slots are drawn too)
    assert enc.x.shape[1] == 1 + num_kept(cfg.num_patches, 0.75) + num_kept(cfg.text_len, 0.75)
    # True = padding: rewriting the ids under padding changes nothing the encoder says about other tokens
    noise_i, noise_t = torch.rand(3, cfg.num_patches), torch.rand(3, cfg.text_len)
    junk = text.masked_scatter(pad, torch.randint(1, cfg.vocab_size, (int(pad.sum()),)))
    a = model.forward_encoder(images, text, pad, noise_i, noise_t)
    b = model.forward_encoder(images, junk, pad, noise_i, noise_t)
    visible_pad = torch.cat([torch.zeros(3, 1 + num_kept(cfg.num_patches, 0.75), dtype=torch.bool),
                             pad.gather(1, noise_t.argsort(1)[:, : num_kept(cfg.text_len, 0.75)])], dim=1)
    assert visible_pad.any()  # the test exercises some visible padding
    torch.testing.assert_close(a.x[~visible_pad], b.x[~visible_pad])
    # the default padding mask is text == 0
    c = model.forward_encoder(images, text, None, noise_i, noise_t)
    torch.testing.assert_close(a.x, c.x)


# --- losses against hand computations -----------------------------------------------------------------------


def test_image_loss_by_hand():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]], [[0.0, 1.0], [2.0, 2.0], [1.0, 1.0]]])
    target = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [0.0, 4.0], [1.0, 3.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # 1 = removed
    # sample 0: patches 0 and 2: ((1+4)/2 + (4+0)/2) / 2 = 2.25; sample 1: patches 1, 2: ((4+4)/2 + (0+4)/2)/2 = 3
    assert image_loss(pred, target, mask).item() == pytest.approx((2.25 + 3.0) / 2)
    # norm_pix: each target patch becomes (t - mean) / sqrt(unbiased var + 1e-6)
    def normed(t):
        m = sum(t) / len(t)
        v = sum((x - m) ** 2 for x in t) / (len(t) - 1)
        return [(x - m) / math.sqrt(v + 1e-6) for x in t]
    expected = []
    for b in range(2):
        errs = [sum((p - t) ** 2 for p, t in zip(pred[b, n].tolist(), normed(target[b, n].tolist()))) / 2
                for n in range(3) if mask[b, n] == 1]
        expected.append(sum(errs) / len(errs))
    assert image_loss(pred, target, mask, norm_pix=True).item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    # nothing removed: zero, not NaN
    assert image_loss(pred, target, torch.zeros(2, 3)).item() == 0.0


def test_text_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]],
                           [[1.0, 1.0, 1.0], [0.0, 2.0, 0.0], [5.0, 0.0, 0.0]]])
    tokens = torch.tensor([[1, 1, 2], [2, 0, 0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # 1 = removed
    pad = torch.tensor([[False, True, False], [False, True, True]])  # True = padding
    ce = lambda row, t: math.log(sum(math.exp(x) for x in row)) - row[t]
    # sample 0: only slot 0 is removed and real; sample 1: only slot 0
    s0 = ce([2.0, 0.0, 0.0], 1)
    s1 = ce([1.0, 1.0, 1.0], 2)
    assert text_loss(logits, tokens, mask, pad).item() == pytest.approx((s0 + s1) / 2, rel=1e-6)
    # averaging is per sample: a sample with two valid tokens averages them before the batch mean
    mask2 = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    s0 = (ce([2.0, 0.0, 0.0], 1) + ce([0.0, 0.0, 3.0], 2)) / 2
    assert text_loss(logits, tokens, mask2, pad).item() == pytest.approx((s0 + s1) / 2, rel=1e-6)
    # a sample with no valid token adds 0 but still counts in the mean; all-padding gives 0, not NaN
    all_pad = torch.ones(2, 3, dtype=torch.bool)
    assert text_loss(logits, tokens, mask, all_pad).item() == 0.0
    pad_one = torch.tensor([[True, True, True], [False, True, True]])
    assert text_loss(logits, tokens, mask, pad_one).item() == pytest.approx(s1 / 2, rel=1e-6)


def test_forward_loss_is_weighted_sum_of_parts():
    cfg = tiny(image_loss_weight=1.0, text_loss_weight=0.5)
    model = M3AE(cfg)
    images, text, pad = batch(cfg)
    noise = torch.rand(3, cfg.num_patches), torch.rand(3, cfg.text_len)
    out, full = model(images, text, pad, *noise), model.reconstruct(images, text, pad, *noise)
    assert out["loss"].item() == pytest.approx(out["image_loss"].item() + 0.5 * out["text_loss"].item(), rel=1e-6)
    expect_img = image_loss(full["image_pred"], patchify(images, cfg.patch_size), full["image_mask"])
    expect_txt = text_loss(full["text_logits"], text, full["text_mask"], pad)
    assert out["image_loss"].item() == pytest.approx(expect_img.item(), rel=1e-6)
    assert out["text_loss"].item() == pytest.approx(expect_txt.item(), rel=1e-6)
    norm = M3AE(tiny(norm_pix_loss=True))
    norm.load_state_dict(model.state_dict())
    a, full = norm(images, text, pad, *noise), norm.reconstruct(images, text, pad, *noise)
    assert a["image_loss"].item() == pytest.approx(
        image_loss(full["image_pred"], patchify(images, cfg.patch_size), full["image_mask"], norm_pix=True).item(),
        rel=1e-6)


def test_a_loss_term_is_weighted_by_its_field():
    """forward_loss weighs the term <name> by the config field <name>_weight: a fork's new term needs no other
    edit to be weighted, summed and logged by name (docs/forking.md)."""
    images, text, pad = batch(tiny())
    torch.manual_seed(0)
    a = M3AE(tiny(image_loss_weight=2.0, text_loss_weight=0.0))
    out = a(images, text, pad, torch.rand(3, 16), torch.rand(3, 24))
    assert set(out) == {"loss", "image_loss", "text_loss"}
    assert out["loss"].item() == pytest.approx(2.0 * out["image_loss"].item(), rel=1e-6)
    assert set(a(images)) == {"loss", "image_loss"}  # an absent modality has no term


@pytest.mark.parametrize("overrides", [{}, dict(norm_pix_loss=True), dict(image_mask_ratio=0.5, text_mask_ratio=0.25),
                                       dict(image_mask_ratio=0.0, text_mask_ratio=0.0)])
@pytest.mark.parametrize("mode", ["paired", "image", "text"])
def test_heads_on_removed_tokens_only_give_the_same_loss_and_gradients(mode, overrides):
    """forward_loss evaluates the heads on the removed tokens only: the same loss and parameter gradients as the
    readable formula on full predictions in fp32, up to summation order (seen: <= 2.4e-7)."""
    cfg = tiny(**overrides)
    torch.manual_seed(0)
    model = M3AE(cfg)
    images, text, pad = batch(cfg, B=4, lengths=[cfg.text_len, 5, 0, 11])  # full, short, empty captions
    noise = torch.rand(4, cfg.num_patches), torch.rand(4, cfg.text_len)
    args = (images if mode != "text" else None, text if mode != "image" else None, pad, *noise)
    results = []
    for readable in (True, False):
        model.zero_grad(set_to_none=True)
        if readable:
            f = full_predictions(model, *args)
            out = {}
            if f["image_pred"] is not None:
                out["image_loss"] = image_loss(f["image_pred"], patchify(images, cfg.patch_size), f["image_mask"],
                                               cfg.norm_pix_loss)
            if f["text_logits"] is not None:
                out["text_loss"] = text_loss(f["text_logits"], text, f["text_mask"], pad)
            out["loss"] = sum(getattr(cfg, k + "_weight") * v for k, v in out.items())
        else:
            out = model(*args)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (full, g_full), (removed, g_removed) = results
    assert full.keys() == removed.keys()
    for key in full:
        torch.testing.assert_close(removed[key], full[key], atol=1e-6, rtol=1e-6)
    assert g_removed.keys() == g_full.keys()  # the same parameters get a gradient
    for name in g_full:
        torch.testing.assert_close(g_removed[name], g_full[name], atol=1e-6, rtol=1e-5, msg=name)
    if overrides.get("image_mask_ratio", 0.75) > 0:
        assert full["loss"] > 0


# --- modes -------------------------------------------------------------------------------------------------


def test_image_only_has_no_hidden_dependence_on_text():
    cfg = tiny()
    model = M3AE(cfg)
    images, _, _ = batch(cfg)
    noise = torch.rand(3, cfg.num_patches)
    ref = model.reconstruct(images, image_noise=noise)
    assert ref["text_logits"] is None and ref["text_mask"] is None and "text_loss" not in model(images)
    # a model with a different text path (other vocabulary, other text weights) and the same image weights
    other = M3AE(tiny(vocab_size=77, text_len=12))
    image_state = {k: v for k, v in model.state_dict().items() if k not in TEXT_PARAMS}
    missing, unexpected = other.load_state_dict(image_state, strict=False)
    assert set(missing) == TEXT_PARAMS and not unexpected
    out = other.reconstruct(images, image_noise=noise)
    assert torch.equal(out["image_pred"], ref["image_pred"])
    assert torch.equal(other(images, image_noise=noise)["loss"], model(images, image_noise=noise)["loss"])
    assert torch.equal(model.encode(images)[0], other.encode(images)[0])


@pytest.mark.parametrize("mode", ["paired", "image", "text"])
def test_gradients_reach_exactly_the_parameters_a_mode_uses(mode):
    cfg = tiny()
    model = M3AE(cfg)
    images, text, pad = batch(cfg)
    model(images if mode != "text" else None, text if mode != "image" else None, pad)["loss"].backward()
    unused = {"paired": set(), "image": TEXT_PARAMS, "text": IMAGE_PARAMS}[mode]
    for name, p in model.named_parameters():
        if name in unused:
            assert p.grad is None, f"{mode} mode sent a gradient to {name}"
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{mode} mode gave no gradient to {name}"


def test_encode_reads_cls_after_final_norm_and_matches_unmasked_encoder():
    cfg = tiny(image_mask_ratio=0.0, text_mask_ratio=0.0)
    model = M3AE(cfg)
    images, text, pad = batch(cfg)
    cls, tokens = model.encode(images, text, pad)
    enc = model.forward_encoder(images, text, pad)  # ratio 0: everything, in a shuffled order
    torch.testing.assert_close(cls, enc.x[:, 0])
    # LayerNorm with weight 1 / bias 0 at init: each feature vector has mean 0, variance 1
    torch.testing.assert_close(cls.mean(-1), torch.zeros(3), atol=1e-5, rtol=0)
    cls_img, tokens_img = model.encode(images)
    assert tokens_img.shape == (3, cfg.num_patches, cfg.emb_dim)


def test_encode_matches_forward_encoder_without_masking():
    """encode() assembles the same sequence as forward_encoder: with nothing removed and the noise in ascending
    order (kept order = natural order) the two are bit for bit equal; with shuffled noise, equal after undoing the
    shuffle. Every mode, with padded captions (one fully padded)."""
    cfg = tiny(image_mask_ratio=0.0, text_mask_ratio=0.0, attn_impl="sdpa")
    model = M3AE(cfg)
    images, text, pad = batch(cfg, lengths=[cfg.text_len, 5, 0])
    N, T = cfg.num_patches, cfg.text_len
    for imgs, txt in ((images, text), (images, None), (None, text)):
        p = pad if txt is not None else None
        cls, tokens = model.encode(imgs, txt, p)
        in_order = model.forward_encoder(imgs, txt, p, torch.arange(N).float().expand(3, N),
                                         torch.arange(T).float().expand(3, T))
        assert torch.equal(torch.cat([cls[:, None], tokens], dim=1), in_order.x)
        shuffled = model.forward_encoder(imgs, txt, p, torch.rand(3, N), torch.rand(3, T))
        parts, start = [shuffled.x[:, :1]], 1
        for masking in (shuffled.image, shuffled.text):
            if masking is not None:
                ids_restore = masking.ids_restore
                L = ids_restore.size(1)
                part = shuffled.x[:, start : start + L]
                parts.append(part.gather(1, ids_restore[:, :, None].expand(-1, -1, part.size(-1))))
                start += L
        torch.testing.assert_close(torch.cat(parts, dim=1), torch.cat([cls[:, None], tokens], dim=1))


def reference_attention_maps(model, images, text, pad):
    """Independent float64 encoder: builds [CLS, patches, text] from the parameters, then per block
    softmax(q k^T / sqrt(hs)) over each sample's visible keys (padded keys: weight 0) and the block's update."""
    c = model.config
    P = {k: v.detach().double() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    B, p, G = images.size(0), c.patch_size, c.grid_size
    patches = images.double().reshape(B, 3, G, p, G, p).permute(0, 2, 4, 3, 5, 1).reshape(B, G * G, -1)
    img = patches @ P["patch_embed.weight"].T + P["patch_embed.bias"] + P["enc_image_pos"] + P["enc_image_type"]
    txt = P["text_embed.weight"][text] + P["enc_text_pos"][:, : text.size(1)] + P["enc_text_type"]
    x = torch.cat([P["cls_token"].expand(B, 1, -1), img, txt], dim=1)  # (B, S, D)
    hidden = torch.cat([torch.zeros(B, 1 + G * G, dtype=torch.bool), pad], dim=1)  # (B, S), True = padding
    B, S, D = x.shape
    nh = c.num_heads
    ln = lambda t, name: torch.nn.functional.layer_norm(t, (D,), P[name + ".weight"], P[name + ".bias"], c.ln_eps)
    lin = lambda t, name: t @ P[name + ".weight"].T + P[name + ".bias"]
    maps = []
    for i in range(c.depth):
        pre = f"encoder.blocks.{i}."
        q, k, v = lin(ln(x, pre + "norm1"), pre + "attn.qkv").reshape(B, S, 3, nh, D // nh).unbind(2)  # (B, S, nh, hs)
        w = torch.zeros(B, nh, S, S, dtype=torch.float64)
        for b in range(B):
            keys = ~hidden[b]
            scores = torch.einsum("qhd,khd->hqk", q[b], k[b, keys]) / math.sqrt(D // nh)
            w[b][:, :, keys] = scores.softmax(dim=-1)
        maps.append(w)
        y = torch.einsum("bhqk,bkhd->bqhd", w, v).reshape(B, S, D)
        x = x + lin(y, pre + "attn.proj")
        h = torch.nn.functional.gelu(lin(ln(x, pre + "norm2"), pre + "mlp.fc1"), approximate=c.gelu)
        x = x + lin(h, pre + "mlp.fc2")
    return maps


def test_attention_maps_match_float64_reference_with_padding():
    cfg = tiny(attn_impl="sdpa")  # attention_maps takes the math path whatever the config says
    model = M3AE(cfg)
    images, text, pad = batch(cfg, lengths=[cfg.text_len, 5, 0])  # one caption fully padded: CLS still visible
    with torch.no_grad():
        maps = model.attention_maps(images, text, pad)
    ref = reference_attention_maps(model, images, text, pad)
    S = 1 + cfg.num_patches + cfg.text_len
    assert len(maps) == cfg.depth
    for layer, (got, want) in enumerate(zip(maps, ref)):
        assert got.shape == (3, cfg.num_heads, S, S), layer
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4, msg=f"layer {layer}")
        text_keys = got[:, :, :, 1 + cfg.num_patches :]  # (B, nh, S, T)
        assert (text_keys.permute(0, 3, 1, 2)[pad] == 0).all()  # padded keys: exactly 0
    with torch.no_grad():  # the default padding mask is text == 0
        assert all(torch.equal(a, b) for a, b in zip(maps, model.attention_maps(images, text)))


# --- attention implementations ---------------------------------------------------------------------------


def reference_attention(q, k, v, key_padding_mask):
    """Independent float64 loop over samples: softmax over the visible keys only; no visible key -> 0."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(q.size(0)):
        keep = ~key_padding_mask[b]
        if keep.any():
            s = q[b].double() @ k[b, :, keep].double().transpose(-2, -1) / math.sqrt(q.size(-1))
            out[b] = s.softmax(-1) @ v[b, :, keep].double()
    return out


def test_attention_implementations_agree_with_padding():
    torch.manual_seed(0)
    B, H, T, hs = 4, 2, 9, 8
    q, k, v = (torch.randn(B, H, T, hs, requires_grad=True) for _ in range(3))
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 5:] = True  # some keys padded
    pad[2, :] = True  # every key padded (a fully padded caption, text-only mode without CLS)
    pad[3, ::2] = True
    ref = reference_attention(q, k, v, pad)
    results = {}
    for impl in ("math", "sdpa"):
        y = attention(q, k, v, pad, impl=impl)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
        results[impl] = torch.autograd.grad(y.square().sum(), (q, k, v))
    for gm, gs in zip(results["math"], results["sdpa"]):
        assert torch.isfinite(gm).all()
        torch.testing.assert_close(gm, gs, atol=1e-5, rtol=1e-5)
    assert (attention(q, k, v, pad, impl="math")[2] == 0).all()  # no visible key -> zeros
    w = attention_weights(q, k, pad)
    torch.testing.assert_close(w[[0, 1, 3]].sum(-1), torch.ones(3, H, T))  # rows sum to 1
    assert (w[1][..., 5:] == 0).all()  # padded keys get no weight
    assert (w[2] == 0).all()  # no visible key: rows of zeros
    assert torch.equal(w @ v, attention(q, k, v, pad, impl="math"))  # the math path is exactly weights @ v


def test_never_empty_drops_only_a_no_op():
    """never_empty=True (what the model passes: CLS is never padding) skips SDPA's all-padding guard, which does
    nothing when every sample has a visible key: bit-identical outputs and gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 8, requires_grad=True) for _ in range(3))
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2, 1::2] = True
    ys = [attention(q, k, v, pad, "sdpa", never_empty=flag) for flag in (False, True)]
    grads = [torch.autograd.grad(y.square().sum(), (q, k, v)) for y in ys]
    assert torch.equal(ys[0], ys[1]) and all(torch.equal(a, b) for a, b in zip(*grads))


def test_attention_impl_rule():
    """auto's choice, from the H200 measurements (kernels/dispatch.py's comment above attention_impl)."""
    enc, dec = 81, 321  # base preset, paired: the encoder's and the decoder's tokens
    assert attention_impl("cpu", False, dec, 32) == "sdpa" and attention_impl("cpu", True, dec, 32) == "sdpa"
    # compiled or graphed: ours at every supported head dim (it won at both shapes)
    for n, d in ((enc, 64), (dec, 32), (17, 16), (1000, 128)):
        assert attention_impl("cuda", True, n, d) == "triton"
    # eager: SDPA where ours lost to its launch cost (the encoder's 81 tokens), ours where it won (321)
    assert attention_impl("cuda", False, enc, 64) == "sdpa"
    assert attention_impl("cuda", False, 65, 64) == "sdpa"  # image-only encoder
    assert attention_impl("cuda", False, dec, 32) == "triton"
    assert attention_impl("cuda", False, 257, 32) == "triton"  # image-only decoder
    assert attention_impl("cuda", False, EAGER_TRITON_MIN_SEQ - 1, 32) == "sdpa"
    # a head dim the kernel lacks (huge: 1280 / 16 = 80) stays on SDPA whatever else holds
    assert attention_impl("cuda", True, dec, 80) == "sdpa" and attention_impl("cuda", False, dec, 80) == "sdpa"


def test_auto_asks_attention_impl_whether_it_is_being_compiled(monkeypatch):
    """kernels.dispatch.fused_attention(auto=True) passes torch.compiler.is_compiling() on: False in eager, True
    while torch.compile traces (backend "eager": dynamo's tracing alone, no compiler needed), with the key count
    and head dim; "sdpa" answers hand the call back to model.attention's SDPA path."""
    from kernels import dispatch

    calls = []

    def spy(*args):
        calls.append(args)
        return "sdpa"

    monkeypatch.setattr(dispatch, "attention_impl", spy)
    q = torch.randn(2, 2, 5, 16)
    k = torch.randn(2, 2, 7, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 3:] = True
    assert dispatch.fused_attention(q, k, k, pad, auto=True) is None
    traced = torch.compile(lambda q, k, pad: dispatch.fused_attention(q, k, k, pad, auto=True), backend="eager",
                           fullgraph=True)
    assert traced(q, k, pad) is None
    assert calls == [("cpu", False, 7, 16), ("cpu", True, 7, 16)]
    torch.testing.assert_close(attention(q, k, k, pad, "auto"), attention(q, k, k, pad, "sdpa"))  # off CUDA


def test_model_outputs_agree_across_attention_impls():
    cfg = tiny()
    model = M3AE(cfg)
    images, text, pad = batch(cfg, B=3, lengths=[cfg.text_len, 3, 0])  # one caption fully padded
    noise = torch.rand(3, cfg.num_patches), torch.rand(3, cfg.text_len)
    outs = {}
    for impl in ("math", "sdpa"):
        model.config.attn_impl = impl
        outs[impl] = {**model(images, text, pad, *noise), **model.reconstruct(images, text, pad, *noise)}
    for key in ("loss", "image_pred", "text_logits"):
        torch.testing.assert_close(outs["math"][key], outs["sdpa"][key], atol=1e-5, rtol=1e-5)


# --- robustness --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["all_padding", "mask_ratio_0", "batch_1", "text_only_all_padding",
                                  "text_mask_ratio_1", "norm_pix_batch_1"])
def test_no_nan_or_inf(case):
    overrides = {"mask_ratio_0": dict(image_mask_ratio=0.0, text_mask_ratio=0.0),
                 "text_mask_ratio_1": dict(text_mask_ratio=0.99), "norm_pix_batch_1": dict(norm_pix_loss=True)}
    cfg = tiny(**overrides.get(case, {}))
    model = M3AE(cfg)
    B = 1 if "batch_1" in case else 3
    lengths = [0] * B if "all_padding" in case else [cfg.text_len] * B
    images, text, pad = batch(cfg, B=B, lengths=lengths)
    out = model(None if case.startswith("text_only") else images, text, pad)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    if case == "mask_ratio_0":
        assert out["loss"].item() == 0.0  # nothing removed, nothing to predict
    if "all_padding" in case:
        assert out["text_loss"].item() == 0.0


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path):
    from checkpoint import checkpoint_dict, load_model

    model = M3AE(tiny(text_mask_ratio=0.5))
    torch.save(checkpoint_dict(model, step=7), tmp_path / "ckpt.pt")
    loaded, ckpt = load_model(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 7 and loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
