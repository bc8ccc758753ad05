"""M3AE: Multimodal Masked Autoencoders (Geng et al., arXiv 2205.14204), in one file.

Read it beside the paper: section 3.1 (architecture), 3.2 (masking), 3.3 (loss). Where the official
JAX code (young-geng/m3ae_public, "official" below) and facebookresearch/mae ("mae") disagree, a
comment says which one we follow; docs/reference.md lists the facts with their sources.

Conventions, stated once (tests/test_model.py asserts each):
  * images are (B, 3, H, W), already normalised with the dataset's mean/std.
  * patches are flattened in (row, col, channel) order; the patch grid is row-major.
  * text is (B, T) int64 token ids, pad id 0, no special tokens.
  * key-padding mask: bool, True = padding. A padded *key* is hidden from attention; padded
    *queries* are still computed (their outputs are never used by the loss).
  * masking mask: float, 1 = removed (hidden from the encoder, predicted by the decoder), 0 = kept.
  * encoder sequence: [CLS, kept image patches, kept text slots]; decoder sequence: [CLS, all
    patches, all text slots]. Image-only mode has no text part at all (this *is* MAE); text-only has
    no image part.
  * every module returns tensors, never tuples; attention weights come from M3AE.attention_maps
    alone.

Shape letters in the comments: B batch, N image patches (grid_size**2), T text slots (text_len), S
sequence length, D width (emb_dim; Dd for the decoder), nh heads, hs head size (D / nh), V
vocabulary, P = p*p*C.
"""

import math
from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from util import at_least, check_fields, fraction, knob

# -----------------------------------------------------------------------------
# config: every model, masking and loss knob is one field here. train.py makes a flag of each field
# with help text (--text-mask-ratio for text_mask_ratio), checks it with `valid`, and a --resume
# refuses a change of it.

GELUS = ("tanh", "none")
ATTN_IMPLS = ("auto", "triton", "sdpa", "math")


@dataclass
class M3AEConfig:
    # data geometry
    image_size: int = knob(256, "image side in pixels; a multiple of --patch-size",
                           at_least(8, 4096), shape=True)
    patch_size: int = knob(16, "patch side in pixels", at_least(1, 256), shape=True)
    in_chans: int = knob(3, shape=True)
    vocab_size: int = knob(32000, valid=at_least(2), shape=True)  # set from the tokenizer
    text_len: int = knob(64, "caption length in tokens, padded or cut", at_least(1, 1024),
                         shape=True)
    # encoder
    emb_dim: int = knob(768, "encoder width; divisible by 4 and by --num-heads", at_least(4, 16384),
                        shape=True)
    depth: int = knob(12, "encoder blocks", at_least(1, 256), shape=True)
    num_heads: int = knob(12, "encoder attention heads", at_least(1), shape=True)
    # decoder: 512 wide, 8 deep, 16 heads for every preset (paper appendix, official code)
    dec_emb_dim: int = knob(512, "decoder width; divisible by 4 and by --dec-num-heads",
                            at_least(4, 16384), shape=True)
    dec_depth: int = knob(8, "decoder blocks", at_least(1, 256), shape=True)
    dec_num_heads: int = knob(16, "decoder attention heads", at_least(1), shape=True)
    mlp_ratio: float = knob(4.0, "MLP hidden width / block width", at_least(0.25, 64), shape=True)
    # official and mae both use LayerNorm eps 1e-6 (not torch's 1e-5); official's GELU is flax's
    # tanh approximation, mae/timm's the exact erf ("none")
    ln_eps: float = knob(1e-6, "LayerNorm epsilon", at_least(0.0, 1.0))
    gelu: str = knob("tanh", "GELU approximation: tanh (official) or none (exact erf, mae)",
                     choices=GELUS)
    # masking, paper section 3.2: ratios chosen independently per modality
    image_mask_ratio: float = knob(0.75, "fraction of patches removed", fraction())
    text_mask_ratio: float = knob(0.75, "fraction of text slots removed, padding counted",
                                  fraction())
    # loss, paper section 3.3: each term of forward_loss is weighted by the field <term>_weight
    image_loss_weight: float = knob(1.0, "weight of the pixel MSE", at_least(0.0),
                                    aliases=("--image-weight",))
    text_loss_weight: float = knob(0.5, "weight of the text CE (official README 0.5, its code "
                                   "default 0.1); 0 trains the MAE baseline", at_least(0.0),
                                   aliases=("--text-weight",))
    # fine-tuning (finetune.py): stochastic depth, rising linearly from 0 at the first encoder block
    # to this rate at the last (mae/timm); the identity in eval mode and at 0
    drop_path_rate: float = knob(0.0, "stochastic depth of the encoder blocks (fine-tuning; 0 in "
                                 "pretraining)", at_least(0.0, 0.9))
    norm_pix_loss: bool = knob(False,
                               "per-patch normalised pixel targets (mae's option; the paper: raw)",
                               aliases=("--norm-pix",))
    # runtime, not the model: "auto" = kernels/dispatch.py's measured choice on CUDA, SDPA elsewhere
    attn_impl: str = knob("auto", "attention implementation", choices=ATTN_IMPLS,
                          aliases=("--attn",), resume="invocation")

    def __post_init__(self):
        check_fields(self)
        for what, dim, heads in (("emb", self.emb_dim, self.num_heads), ("dec", self.dec_emb_dim,
                                                                         self.dec_num_heads)):
            if dim % heads or dim % 4:  # sin-cos positions split the width in 4 (sincos_2d)
                flag = "--emb-dim" if what == "emb" else "--dec-emb-dim"
                raise ValueError(f"argument {flag}: {dim} must divide by 4 and by its heads "
                                 f"({heads})")
        if self.image_size % self.patch_size:
            fits = [p for p in (2, 4, 7, 8, 14, 16, 32)
                    if self.image_size % p == 0 and p < self.image_size]
            raise ValueError(f"argument --image-size: {self.image_size} is not a multiple of "
                             f"--patch-size {self.patch_size}"
                             + (f" (patch sizes that divide it: {fits})" if fits else ""))

    @property
    def grid_size(self):
        return self.image_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid_size**2

    @property
    def patch_dim(self):
        return self.patch_size**2 * self.in_chans


# width/depth/heads per preset (paper Table 6 / official get_transformer_by_config). `tiny` is ours:
# small enough to pretrain on 2 CPU cores in minutes: 32 px images, 8 px patches (a 4x4 grid, 4
# visible at mask 0.75), 24-token captions (the built-in captions' 99th percentile), 128 wide, 4
# deep.
PRESETS = {
    "tiny": dict(image_size=32, patch_size=8, vocab_size=1024, text_len=24, emb_dim=128, depth=4,
                 num_heads=4, dec_emb_dim=128, dec_depth=2, dec_num_heads=4),
    "small": dict(emb_dim=384, depth=12, num_heads=6),
    "base": dict(emb_dim=768, depth=12, num_heads=12),
    "large": dict(emb_dim=1024, depth=24, num_heads=16),
    "huge": dict(emb_dim=1280, depth=32, num_heads=16),
}


def make_config(preset="base", **overrides):
    """A preset's config with any field overridden, e.g. make_config("tiny",
    text_mask_ratio=0.5)."""
    names = {f.name for f in fields(M3AEConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown config fields: {sorted(unknown)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
    return replace(M3AEConfig(), **{**PRESETS[preset], **overrides})


# -----------------------------------------------------------------------------
# fixed sin-cos positions (not parameters; official and mae alike)


def sincos_1d(dim, positions):
    """(L,) positions -> (L, dim): first half sin, second half cos, frequencies
    1/10000^(i/(dim/2))."""
    assert dim % 2 == 0
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim, grid_size):
    """(grid_size**2, dim) table for a row-major patch grid: the column coordinate fills the first
    half of the dimensions and the row coordinate the second half (mae's and official's layout)."""
    assert dim % 4 == 0
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())],
                     dim=1)


# -----------------------------------------------------------------------------
# attention: one key-padding convention (True = padding), three implementations


def _unhide_empty_rows(key_padding_mask):
    """A sample whose keys are all padding would softmax over nothing (NaN with -inf, and NaN
    survives a later torch.where in the backward pass). Un-hide its keys so softmax stays finite;
    the caller zeros its output. Returns (the mask to use, empty_rows (B,) bool)."""
    empty_rows = key_padding_mask.all(dim=1)  # (B,)
    return key_padding_mask & ~empty_rows[:, None], empty_rows


def attention_weights(q, k, key_padding_mask=None):
    """softmax(q k^T / sqrt(hs)) over the visible keys: the math path's weights, (B, nh, Tq, Tk).

    q: (B, nh, Tq, hs); k: (B, nh, Tk, hs); key_padding_mask: (B, Tk) bool, True = padding, or None.
    A padded key gets weight 0; a sample with no visible key gets rows of zeros. Each other row sums
    to 1."""
    empty_rows = None
    if key_padding_mask is not None:
        key_padding_mask, empty_rows = _unhide_empty_rows(key_padding_mask)
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5  # (B, nh, Tq, Tk)
    if key_padding_mask is not None:
        # official replaces padded logits by -1e7; the most negative float is the same after softmax
        scores = scores.masked_fill(key_padding_mask[:, None, None, :],
                                    torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    if empty_rows is not None:
        weights = weights.masked_fill(empty_rows[:, None, None, None], 0.0)
    return weights


def attention(q, k, v, key_padding_mask=None, impl="sdpa", never_empty=False):
    """Multi-head attention with an optional key-padding mask: one function, three implementations.

    q: (B, nh, Tq, hs); k, v: (B, nh, Tk, hs); key_padding_mask: (B, Tk) bool, True = padding
    (hidden as a key) or None. Returns (B, nh, Tq, hs). A query whose keys are all padding gets
    zeros (never NaN); in the model this cannot happen because CLS is always a visible key.
    impl: "math" (readable reference: attention_weights @ v), "sdpa" (torch's
    scaled_dot_product_attention), "triton" (our fused kernel in kernels/), "auto" (SDPA off CUDA;
    on CUDA kernels/dispatch.py's choice for the sequence length and head dim, from measurements).
    Only "math" forms the weights; M3AE.attention_maps reads them through attention_weights.
    never_empty=True: the caller guarantees that every sample has a visible key (M3AE: CLS is never
    padding), so "sdpa" skips its guard against all-padding rows (un-hide their keys, then zero
    their output: one more pass over the output in the forward and one in the backward). The other
    paths need no guard.
    """
    # the fused kernel and when it pays: kernels/
    if impl == "triton" or (impl == "auto" and q.is_cuda):
        from kernels.dispatch import fused_attention

        # None: SDPA is faster here
        y = fused_attention(q, k, v, key_padding_mask, auto=impl == "auto")
        if y is not None:
            return y
        impl = "sdpa"
    if impl == "auto":
        impl = "sdpa"  # off CUDA: the fused kernel only runs in Triton's interpreter (tests)
    if impl == "math":
        return attention_weights(q, k, key_padding_mask) @ v  # (B, nh, Tq, hs)
    if impl != "sdpa":
        raise ValueError(f"unknown attention impl {impl!r}; choose auto, triton, sdpa or math")
    empty_rows = None
    if key_padding_mask is not None and not never_empty:
        key_padding_mask, empty_rows = _unhide_empty_rows(key_padding_mask)
    # True = attend
    attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, Tq, hs)
    if empty_rows is not None:
        y = y.masked_fill(empty_rows[:, None, None, None], 0.0)
    return y


# -----------------------------------------------------------------------------
# transformer blocks (pre-LayerNorm ViT blocks; names follow timm so mae checkpoints map one to one)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        # output laid out [q | k | v], heads contiguous
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x):
        """(B, S, D) -> q, k, v, each (B, nh, S, hs)."""
        B, S, D = x.shape
        return self.qkv(x).view(B, S, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)

    def forward(self, x, key_padding_mask=None, impl="sdpa"):
        B, S, D = x.shape
        q, k, v = self.heads(x)  # (B, nh, S, hs) each
        # never_empty: every sequence M3AE builds starts with CLS, which is never padding
        y = attention(q, k, v, key_padding_mask, impl, never_empty=True)  # (B, nh, S, hs)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))  # heads side by side again: (B, S, D)


class MLP(nn.Module):
    def __init__(self, dim, hidden, gelu):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gelu = gelu

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu))


def drop_path(x, rate, training):
    """Stochastic depth (Huang et al. 2016; timm's DropPath): in training, each sample's residual
    branch x (B, ...) is dropped with probability `rate` and kept ones are scaled by 1 / (1 -
    rate), so its expectation is unchanged; the identity in eval mode or at rate 0."""
    if rate == 0.0 or not training:
        return x
    keep = torch.rand(x.size(0), *[1] * (x.ndim - 1), device=x.device) >= rate  # (B, 1, 1)
    return x * keep.to(x.dtype) / (1.0 - rate)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, ln_eps, gelu, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), gelu)
        self.drop_path = drop_path  # stochastic depth of both residual branches (fine-tuning)

    def forward(self, x, key_padding_mask=None, impl="sdpa"):
        y = self.attn(self.norm1(x), key_padding_mask, impl)  # (B, S, D)
        x = x + drop_path(y, self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class Transformer(nn.Module):
    """A stack of blocks and a final LayerNorm (used for both the encoder and the decoder).
    drop_path_rate: block i's stochastic depth is rate x i / (depth - 1), 0 at the first (mae)."""

    def __init__(self, dim, depth, num_heads, mlp_ratio, ln_eps, gelu, drop_path_rate=0.0):
        super().__init__()
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linspace
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, ln_eps, gelu, rates[i])
                                     for i in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=ln_eps)

    def forward(self, x, key_padding_mask=None, impl="sdpa"):
        for block in self.blocks:
            x = block(x, key_padding_mask, impl)  # (B, S, D)
        return self.norm(x)


# -----------------------------------------------------------------------------
# patches and masking


def patchify(images, p):
    """(B, C, H, W) -> (B, N, p*p*C), grid row-major, each patch flattened in (row, col, channel)
    order."""
    B, C, H, W = images.shape
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(patches, p, channels=3):
    """Inverse of patchify: (B, N, p*p*C) -> (B, C, H, W) for a square grid."""
    B, N, _ = patches.shape
    h = w = math.isqrt(N)
    x = patches.reshape(B, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, channels, h * p, w * p)


def num_kept(length, mask_ratio):
    """keep = floor(L * (1 - ratio)), as official: 64 of 256 patches and 16 of 64 text slots at
    0.75."""
    return int(length * (1.0 - mask_ratio))


class Masking(NamedTuple):
    """Which tokens of one modality the encoder sees; every count follows from these shapes.
      ids_keep (B, K): the visible positions, in the order they enter the encoder;
      ids_removed (B, L - K): the hidden ones, which the decoder predicts and the loss reads;
      ids_restore (B, L): gathering [visible, mask tokens] with it puts them back in natural order;
      mask (B, L) float: 1 = removed, 0 = visible."""
    ids_keep: torch.Tensor
    ids_removed: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def masking_from_order(order, keep):
    """The Masking that keeps the `keep` lowest entries of each row of `order` (B, L) (a stable
    sort: ties keep their natural order)."""
    ids_shuffle = order.argsort(dim=1, stable=True)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = (ids_restore >= keep).float()  # 1 = removed
    return Masking(ids_shuffle[:, :keep], ids_shuffle[:, keep:], ids_restore, mask)


def random_masking(noise, mask_ratio):
    """The paper's rule (section 3.2): per sample, keep the floor(L x (1 - ratio)) positions of
    lowest noise (mae's scheme; official draws one noise row for the whole batch, which equal rows
    reproduce). noise: (B, L) floats. A different masking strategy is a different function returning
    a Masking."""
    return masking_from_order(noise, num_kept(noise.size(1), mask_ratio))


def visible_masking(visible):
    """An explicit choice of visible tokens: visible (B, L) bool, True = the encoder sees it, the
    same count in every row (so the batch stays one tensor). The visible ones enter in their natural
    order."""
    counts = visible.sum(dim=1)
    if len(counts) and not bool((counts == counts[0]).all()):
        raise ValueError("visible: every row must show as many tokens (got "
                         f"{sorted(set(counts.tolist()))})")
    return masking_from_order((~visible).to(torch.uint8), int(counts[0]) if len(counts) else 0)


def gather_tokens(x, ids):
    """x: (B, L, D), ids: (B, K) -> (B, K, D)."""
    return x.gather(1, ids[:, :, None].expand(-1, -1, x.size(-1)))


def unshuffle(kept, mask_token, ids_restore):
    """Append mask tokens to the kept tokens (B, keep, D) and undo the shuffle: -> (B, L, D),
    natural order."""
    B, L = ids_restore.shape
    full = torch.cat([kept, mask_token.expand(B, L - kept.size(1), -1)], dim=1)  # shuffled order
    return gather_tokens(full, ids_restore)


# -----------------------------------------------------------------------------
# losses (paper section 3.3), each averaged per sample first and then over the batch, as official


def patch_mse(pred, target, norm_pix=False):
    """Squared error per patch, (B, M): pred, target (B, M, p*p*C). norm_pix normalises each target
    patch by its own mean and variance (mae's option; unbiased variance, eps 1e-6, as mae)."""
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return (pred.float() - target.float()).pow(2).mean(dim=-1)


def token_ce(logits, tokens):
    """Cross-entropy per token, (B, M) float32: logits (B, M, V) (any float dtype), tokens (B, M).
    The class dim stays the last, contiguous one, and log_softmax reads bf16 logits without an fp32
    copy first."""
    logp = F.log_softmax(logits.flatten(0, 1), dim=-1, dtype=torch.float32)  # (B*M, V)
    return F.nll_loss(logp, tokens.flatten(), reduction="none").view(tokens.shape)


def per_sample_mean(values, weights):
    """sum(values x weights) / max(sum(weights), 1e-5) per sample (official), then the batch mean: a
    sample with nothing to score adds 0 but still counts, so the loss is never NaN. values, weights:
    (B, M)."""
    return ((values * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-5)).mean()


# -----------------------------------------------------------------------------
# the model


class Encoded(NamedTuple):
    """The encoder's output on a masked input: x (B, 1 + K_img + K_txt, D) after the final norm, the
    Masking of each modality (None when absent) and the text padding mask (B, T) (None without
    text)."""
    x: torch.Tensor
    image: Optional[Masking]
    text: Optional[Masking]
    text_padding_mask: Optional[torch.Tensor]


class M3AE(nn.Module):
    """One ViT encoder over [CLS, visible patches, visible text], an MAE-style decoder over
    everything.

    The same weights run three modes, chosen by which inputs are given: paired (images and text),
    image-only (text=None: exactly MAE, the paper's baseline) and text-only (images=None).
    """

    def __init__(self, config: M3AEConfig):
        super().__init__()
        self.config = c = config
        D, Dd = c.emb_dim, c.dec_emb_dim
        # encoder inputs: a linear patch projection and a token table (no sqrt(D) scaling, as
        # official)
        self.patch_embed = nn.Linear(c.patch_dim, D)
        self.text_embed = nn.Embedding(c.vocab_size, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # learned type (modality) embeddings, one per modality and per side (section 3.1)
        self.enc_image_type = nn.Parameter(torch.zeros(1, 1, D))
        self.enc_text_type = nn.Parameter(torch.zeros(1, 1, D))
        self.dec_image_type = nn.Parameter(torch.zeros(1, 1, Dd))
        self.dec_text_type = nn.Parameter(torch.zeros(1, 1, Dd))
        # fixed sin-cos positions: buffers, not saved (recomputed from the config), none on CLS
        self.register_buffer("enc_image_pos", sincos_2d(D, c.grid_size)[None], persistent=False)
        self.register_buffer("enc_text_pos", sincos_1d(D, torch.arange(c.text_len))[None],
                             persistent=False)
        self.register_buffer("dec_image_pos", sincos_2d(Dd, c.grid_size)[None], persistent=False)
        self.register_buffer("dec_text_pos", sincos_1d(Dd, torch.arange(c.text_len))[None],
                             persistent=False)

        self.encoder = Transformer(D, c.depth, c.num_heads, c.mlp_ratio, c.ln_eps, c.gelu,
                                   c.drop_path_rate)
        # decoder: one projection shared by CLS, image and text; a mask token per modality
        self.decoder_embed = nn.Linear(D, Dd)
        self.image_mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.text_mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder = Transformer(Dd, c.dec_depth, c.dec_num_heads, c.mlp_ratio, c.ln_eps, c.gelu)
        self.image_head = nn.Linear(Dd, c.patch_dim)  # pixels per patch
        self.text_head = nn.Linear(Dd, c.vocab_size)  # untied from text_embed, as official
        self.reset_parameters()

    def reset_parameters(self):
        # Official init (mae agrees except where noted): xavier-uniform Linear weights (the fused
        # qkv as one matrix), zero biases, LayerNorm 1/0, normal(0.02) for CLS, type embeddings and
        # mask tokens.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.enc_image_type, self.enc_text_type, self.dec_image_type,
                  self.dec_text_type, self.image_mask_token, self.text_mask_token):
            nn.init.normal_(p, std=0.02)
        # Official text table: flax nn.Embed's default normal(std 1.0), not 0.02 (mae has no text).
        nn.init.normal_(self.text_embed.weight, std=1.0)

    # --- embeddings -------------------------------------------------------------------------------

    def embed_image(self, images):
        """(B, C, H, W) -> (B, N, D): patch projection + 2D position + image type (before
        masking)."""
        x = self.patch_embed(patchify(images, self.config.patch_size))
        return x + self.enc_image_pos + self.enc_image_type

    def embed_text(self, text):
        """(B, T) -> (B, T, D): token embedding + 1D position + text type (before masking)."""
        return self.text_embed(text) + self.enc_text_pos[:, : text.size(1)] + self.enc_text_type

    def _check_inputs(self, images, text, text_padding_mask):
        if images is None and text is None:
            raise ValueError("give images, text or both")
        if text is not None:
            if text.size(1) > self.config.text_len:
                raise ValueError(f"text has {text.size(1)} tokens, config.text_len is "
                                 f"{self.config.text_len}")
            if text_padding_mask is None:
                text_padding_mask = text == 0  # pad id 0
            if text_padding_mask.dtype != torch.bool or text_padding_mask.shape != text.shape:
                raise ValueError("text_padding_mask must be a bool tensor shaped like text "
                                 "(True = padding)")
        return text_padding_mask

    def masking(self, batch_size, length, ratio, noise=None, visible=None, device=None,
                rule=random_masking):
        """One modality's Masking: `visible` (B, L) bool if given, else rule(noise, ratio) (the
        paper's random_masking) of `noise` (B, L) or of fresh uniform noise. The only place a
        forward decides what is hidden; a fork's masking rule is passed as `rule`."""
        if visible is not None:
            return visible_masking(visible.to(device))
        if noise is None:
            noise = torch.rand(batch_size, length, device=device)
        if noise.shape != (batch_size, length):
            raise ValueError(f"noise must be ({batch_size}, {length}), got {tuple(noise.shape)}")
        return rule(noise.to(device), ratio)

    # --- encoder ----------------------------------------------------------------------------------

    def _encoder_input(self, images, text, text_padding_mask, image_masking=None,
                       text_masking=None):
        """The encoder's input before any block: [CLS, patches, text slots], each embedded with its
        position and type; a modality with a Masking keeps its visible tokens only, one without
        keeps all in natural order. Returns (x (B, S, D), pad (B, S) bool, True = padding, or None
        without text)."""
        B = images.size(0) if images is not None else text.size(0)
        device = self.cls_token.device
        xs = [self.cls_token.expand(B, -1, -1)]  # (B, 1, D)
        pads = [torch.zeros(B, 1, dtype=torch.bool, device=device)]  # CLS is never padding
        if images is not None:
            x_img = self.embed_image(images)  # (B, N, D)
            if image_masking is not None:
                x_img = gather_tokens(x_img, image_masking.ids_keep)  # (B, K_img, D)
            xs.append(x_img)
            pads.append(torch.zeros(B, x_img.size(1), dtype=torch.bool, device=device))
        if text is not None:
            x_txt, pad = self.embed_text(text), text_padding_mask  # (B, T, D), (B, T)
            if text_masking is not None:
                # Padding slots take part in the draw (the paper's keep count includes them); a
                # padding slot that stays visible is hidden as an attention key.
                ids = text_masking.ids_keep
                # K_txt slots
                x_txt, pad = gather_tokens(x_txt, ids), text_padding_mask.gather(1, ids)
            xs.append(x_txt)
            pads.append(pad)
        return torch.cat(xs, dim=1), (torch.cat(pads, dim=1) if text is not None else None)

    def forward_encoder(self, images=None, text=None, text_padding_mask=None, image_noise=None,
                        text_noise=None, image_visible=None, text_visible=None):
        """Mask each modality (self.masking), then encode [CLS, visible patches, visible text]: an
        Encoded."""
        c = self.config
        text_padding_mask = self._check_inputs(images, text, text_padding_mask)
        B = images.size(0) if images is not None else text.size(0)
        device = self.cls_token.device
        image_masking = text_masking = None
        if images is not None:
            image_masking = self.masking(B, c.num_patches, c.image_mask_ratio, image_noise,
                                         image_visible, device)
        if text is not None:
            text_masking = self.masking(B, text.size(1), c.text_mask_ratio, text_noise,
                                        text_visible, device)
        x, pad = self._encoder_input(images, text, text_padding_mask, image_masking, text_masking)
        x = self.encoder(x, pad, c.attn_impl)  # (B, 1 + K_img + K_txt, D)
        return Encoded(x, image_masking, text_masking, text_padding_mask)

    # --- decoder ----------------------------------------------------------------------------------

    def decode(self, enc):
        """Re-insert mask tokens, unshuffle, add decoder positions and types, decode [CLS, all
        patches, all text slots]. Returns the decoder's output per modality, before the heads:
        (x_img (B, N, Dd) or None, x_txt (B, T, Dd) or None). How many tokens were visible is read
        from the Maskings."""
        # (B, 1 + K_img + K_txt, Dd): one projection for CLS, image and text
        x = self.decoder_embed(enc.x)
        B = x.size(0)
        # CLS: (B, 1, Dd)
        xs, pads = [x[:, :1]], [torch.zeros(B, 1, dtype=torch.bool, device=x.device)]
        n_img, start = 0, 1
        if enc.image is not None:
            n_img, keep = enc.image.ids_restore.size(1), enc.image.ids_keep.size(1)
            x_img = unshuffle(x[:, start : start + keep], self.image_mask_token,
                              enc.image.ids_restore)
            xs.append(x_img + self.dec_image_pos + self.dec_image_type)  # (B, N, Dd)
            pads.append(torch.zeros(B, n_img, dtype=torch.bool, device=x.device))
            start += keep
        if enc.text is not None:
            T = enc.text.ids_restore.size(1)
            x_txt = unshuffle(x[:, start:], self.text_mask_token, enc.text.ids_restore)
            xs.append(x_txt + self.dec_text_pos[:, :T] + self.dec_text_type)  # (B, T, Dd)
            pads.append(enc.text_padding_mask)  # the decoder hides every padding slot (as official)
        pad = torch.cat(pads, dim=1) if enc.text is not None else None
        # decoder's CLS dropped
        x = self.decoder(torch.cat(xs, dim=1), pad, self.config.attn_impl)[:, 1:]
        return (x[:, :n_img] if n_img else None), (x[:, n_img:] if enc.text is not None else None)

    # --- the loss: one method, one path on every device -------------------------------------------

    def forward_loss(self, images, text, enc, x_img, x_txt):
        """The training objective (section 3.3), with each head run on the removed tokens only (the
        only ones the loss reads: no logits for the visible text slots). Returns {"loss": the
        weighted sum, and each term by name}; the term "<name>" is weighted by the config field
        "<name>_weight", so a new term is a few lines here plus one field, and train.py logs it by
        name. An absent modality has no term."""
        c, terms = self.config, {}
        if x_img is not None:
            ids = enc.image.ids_removed  # (B, M)
            pred = self.image_head(gather_tokens(x_img, ids))  # (B, M, p*p*C)
            target = gather_tokens(patchify(images, c.patch_size), ids)
            mse = patch_mse(pred, target, c.norm_pix_loss)  # (B, M): MSE on the removed patches
            terms["image_loss"] = per_sample_mean(mse, torch.ones_like(mse))
        if x_txt is not None:
            ids = enc.text.ids_removed  # (B, M): removed padding slots are scored at weight 0
            ce = token_ce(self.text_head(gather_tokens(x_txt, ids)), text.gather(1, ids))  # (B, M)
            terms["text_loss"] = per_sample_mean(ce,
                                                 (~enc.text_padding_mask.gather(1, ids)).float())
        loss = sum(getattr(c, name + "_weight") * value for name, value in terms.items())
        return {"loss": loss, **terms}

    def forward(self, images=None, text=None, text_padding_mask=None, image_noise=None,
                text_noise=None, image_visible=None, text_visible=None):
        """Masked reconstruction loss. images (B, 3, H, W) or None; text (B, T) int64 or None;
        text_padding_mask (B, T) bool, True = pad (default: text == 0). What is hidden: *_visible
        (B, L) bool if given, else random_masking of *_noise (B, L) (None: fresh noise) at the
        config's ratio. Returns forward_loss's dict: the loss and its terms by name (the masks
        drawn: forward_encoder or reconstruct)."""
        enc = self.forward_encoder(images, text, text_padding_mask, image_noise, text_noise,
                                   image_visible, text_visible)
        return self.forward_loss(images, text, enc, *self.decode(enc))

    @torch.no_grad()
    def reconstruct(self, images=None, text=None, text_padding_mask=None, image_noise=None,
                    text_noise=None, image_visible=None, text_visible=None):
        """What the decoder predicts everywhere, for looking at (viz.py), not for training: the same
        inputs as forward; returns image_pred (B, N, p*p*C), text_logits (B, T, V) (None for an
        absent modality) and image_mask / text_mask (1 = removed)."""
        enc = self.forward_encoder(images, text, text_padding_mask, image_noise, text_noise,
                                   image_visible, text_visible)
        x_img, x_txt = self.decode(enc)
        return dict(image_pred=self.image_head(x_img) if x_img is not None else None,
                    text_logits=self.text_head(x_txt) if x_txt is not None else None,
                    image_mask=enc.image.mask if enc.image else None,
                    text_mask=enc.text.mask if enc.text else None)

    # --- downstream: the encoder on the whole, unmasked input -------------------------------------

    def encode(self, images=None, text=None, text_padding_mask=None):
        """Encode without masking, for probes and visualisation. Returns (cls, tokens): cls (B, D)
        is the CLS feature after the final norm (what the paper's linear probe reads); tokens (B, N
        [+ T], D) are the patch (then text) features in their natural order."""
        text_padding_mask = self._check_inputs(images, text, text_padding_mask)
        x, pad = self._encoder_input(images, text, text_padding_mask)
        x = self.encoder(x, pad, self.config.attn_impl)  # (B, 1 + N [+ T], D)
        return x[:, 0], x[:, 1:]

    def attention_maps(self, images=None, text=None, text_padding_mask=None):
        """The encoder's attention weights on the whole, unmasked input (as the paper's Figures 7
        and 8): a list with one (B, nh, S, S) tensor per layer over the sequence [CLS, patches,
        text], S = 1 + N [+ T]; row = query, column = key. Each row sums to 1 and a padded key
        gets 0. It runs the math path whatever config.attn_impl says (SDPA and the fused kernel
        never form the weights): each block's q and k are recomputed from the block's input with the
        block's own modules. Call it under torch.no_grad() unless you want gradients through the
        maps."""
        text_padding_mask = self._check_inputs(images, text, text_padding_mask)
        x, pad = self._encoder_input(images, text, text_padding_mask)  # (B, S, D)
        maps = []
        for block in self.encoder.blocks:
            q, k, _ = block.attn.heads(block.norm1(x))  # (B, nh, S, hs) each
            maps.append(attention_weights(q, k, pad))  # (B, nh, S, S)
            x = block(x, pad, "math")  # (B, S, D)
        return maps


def count_parameters(config):

    """Parameter counts by part, computed on the meta device (no memory, any preset)."""
    with torch.device("meta"):
        model = M3AE(config)
    n = lambda module: sum(p.numel() for p in module.parameters())
    image_in = n(model.patch_embed) + model.cls_token.numel() + model.enc_image_type.numel()
    counts = {
        "encoder (ViT image path)": n(model.encoder) + image_in,
        "text embedding + type": n(model.text_embed) + model.enc_text_type.numel(),
        "decoder (with heads, mask tokens)": n(model) - n(model.encoder) - image_in
        - n(model.text_embed) - model.enc_text_type.numel(),
    }
    counts["total"] = n(model)
    return counts


if __name__ == "__main__":
    # `python model.py`: parameter counts per preset. ViT-B/16 encoder: about 86M, as in the ViT
    # paper.
    for name in PRESETS:
        cfg = make_config(name)
        parts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in count_parameters(cfg).items())
        print(f"{name:>5} ({cfg.emb_dim}/{cfg.depth}/{cfg.num_heads}, "
              f"{cfg.image_size}px/{cfg.patch_size}, vocab {cfg.vocab_size}): {parts}")
