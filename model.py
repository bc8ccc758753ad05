"""M3AE: Multimodal Masked Autoencoders (Geng et al., arXiv 2205.14204), in one file.

Read it beside the paper: section 3.1 (architecture), 3.2 (masking), 3.3 (loss). Where the official JAX
code (young-geng/m3ae_public, "official" below) and facebookresearch/mae ("mae") disagree, a comment
says which one we follow; docs/reference.md lists the facts with their sources.

Conventions, stated once (tests/test_model.py asserts each):
  * images are (B, 3, H, W), already normalised with the dataset's mean/std.
  * patches are flattened in (row, col, channel) order; the patch grid is row-major.
  * text is (B, T) int64 token ids, pad id 0, no special tokens.
  * key-padding mask: bool, True = padding. A padded *key* is hidden from attention; padded *queries*
    are still computed (their outputs are never used by the loss).
  * masking mask: float, 1 = removed (hidden from the encoder, predicted by the decoder), 0 = kept.
  * encoder sequence: [CLS, kept image patches, kept text slots]; decoder sequence: [CLS, all patches,
    all text slots]. Image-only mode has no text part at all (this *is* MAE); text-only has no image part.
  * every module returns tensors, never tuples; attention weights come from M3AE.attention_maps alone.

Shape letters in the comments: B batch, N image patches (grid_size**2), T text slots (text_len), S sequence
length, D width (emb_dim; Dd for the decoder), nh heads, hs head size (D / nh), V vocabulary, P = p*p*C.
"""

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config


@dataclass
class M3AEConfig:
    # data geometry
    image_size: int = 256  # official pretrains at 256 px (mae: 224)
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 32000  # train.py sets it from the tokenizer
    text_len: int = 64  # captions padded/truncated to this many tokens
    # encoder (presets below set these)
    emb_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    # decoder: 512 wide, 8 deep, 16 heads for every preset (paper appendix, official code)
    dec_emb_dim: int = 512
    dec_depth: int = 8
    dec_num_heads: int = 16
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-6  # official and mae both use 1e-6, not torch's 1e-5
    gelu: str = "tanh"  # official (flax nn.gelu) uses the tanh approximation; mae/timm uses "none" (exact erf)
    # masking, paper section 3.2: ratios chosen independently per modality
    image_mask_ratio: float = 0.75
    text_mask_ratio: float = 0.75
    # loss, paper section 3.3: L = image_loss_weight * MSE + text_loss_weight * CE
    image_loss_weight: float = 1.0
    text_loss_weight: float = 0.5  # official README's command uses 0.5 (its code default is 0.1)
    norm_pix_loss: bool = False  # False: raw (dataset-normalised) pixels as the paper; True: mae's per-patch norm
    # runtime: "auto" (attention_impl: SDPA off CUDA; on CUDA our Triton kernel where it measured faster), "triton",
    # "sdpa" or "math"
    attn_impl: str = "auto"

    @property
    def grid_size(self):
        return self.image_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid_size**2

    @property
    def patch_dim(self):
        return self.patch_size**2 * self.in_chans


# width/depth/heads per preset (paper Table 6 / official get_transformer_by_config). `tiny` is ours: small
# enough to pretrain on 2 CPU cores in minutes: 32 px images, 8 px patches (a 4x4 grid, 4 visible at mask 0.75),
# 24-token captions (the built-in captions' 99th percentile), 128 wide, 4 deep.
PRESETS = {
    "tiny": dict(image_size=32, patch_size=8, vocab_size=1024, text_len=24, emb_dim=128, depth=4, num_heads=4,
                 dec_emb_dim=128, dec_depth=2, dec_num_heads=4),
    "small": dict(emb_dim=384, depth=12, num_heads=6),
    "base": dict(emb_dim=768, depth=12, num_heads=12),
    "large": dict(emb_dim=1024, depth=24, num_heads=16),
    "huge": dict(emb_dim=1280, depth=32, num_heads=16),
}


def make_config(preset="base", **overrides):
    """A preset's config with any field overridden, e.g. make_config("tiny", text_mask_ratio=0.5)."""
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
    """(L,) positions -> (L, dim): first half sin, second half cos, frequencies 1/10000^(i/(dim/2))."""
    assert dim % 2 == 0
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim, grid_size):
    """(grid_size**2, dim) table for a row-major patch grid: the column coordinate fills the first half of
    the dimensions and the row coordinate the second half (mae's and official's layout)."""
    assert dim % 4 == 0
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)


# -----------------------------------------------------------------------------
# attention: one key-padding convention (True = padding), three implementations


def _unhide_empty_rows(key_padding_mask):
    """A sample whose keys are all padding would softmax over nothing (NaN with -inf, and NaN survives a later
    torch.where in the backward pass). Un-hide its keys so softmax stays finite; the caller zeros its output.
    Returns (the mask to use, empty_rows (B,) bool)."""
    empty_rows = key_padding_mask.all(dim=1)  # (B,)
    return key_padding_mask & ~empty_rows[:, None], empty_rows


def attention_weights(q, k, key_padding_mask=None):
    """softmax(q k^T / sqrt(hs)) over the visible keys: the math path's weights, (B, nh, Tq, Tk).

    q: (B, nh, Tq, hs); k: (B, nh, Tk, hs); key_padding_mask: (B, Tk) bool, True = padding, or None. A padded
    key gets weight 0; a sample with no visible key gets rows of zeros. Each other row sums to 1."""
    empty_rows = None
    if key_padding_mask is not None:
        key_padding_mask, empty_rows = _unhide_empty_rows(key_padding_mask)
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5  # (B, nh, Tq, Tk)
    if key_padding_mask is not None:
        # official replaces padded logits by -1e7; the most negative float is the same after softmax
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    if empty_rows is not None:
        weights = weights.masked_fill(empty_rows[:, None, None, None], 0.0)
    return weights


# What impl="auto" runs on CUDA, from the H200 measurements of 2026-11-26 (docs/gpu_2026-11-26, kernels/README.md:
# batch 256, bf16, forward + backward of one attention call, ours against SDPA with the same mask):
#   * launches captured (torch.compile, CUDA graphs): ours won at both of M3AE's shapes, the encoder's 81 tokens
#     (D 64; 0.53x SDPA's time) and the decoder's 321 (D 32; 0.39x), and the whole compiled base step took
#     74.1 ms against 90.2 ms;
#   * eager: each call of ours costs ~0.9 ms of Python launch work (autotuner lookup, two Triton launchers),
#     which the GPU work hides only at the decoder's size: encoder 2.40x SDPA's time (3.5x without a mask),
#     decoder 0.40x (0.78x without a mask).
# So eager calls use our kernel only for sequences of at least EAGER_TRITON_MIN_SEQ keys. The two measured points
# bracket the cross-over (81 lost, 321 won, with and without a mask); 256 is the decoder's lower end (1 + 256
# patches at 256 px) and keeps every encoder shape (at most 1 + 64 + 16 = 81 tokens) on SDPA. Lengths between 81
# and 321 were not measured.
EAGER_TRITON_MIN_SEQ = 256


def attention_impl(device_type, launch_free, seq_len, head_dim):
    """impl="auto"'s choice, "triton" or "sdpa". device_type: "cuda", "cpu", ...; launch_free: the call is being
    traced by torch.compile or captured in a CUDA graph (no per-call Python launch cost); seq_len: keys per
    sample; head_dim: per head (the kernel takes 16, 32, 64 and 128; huge's 80 stays on SDPA)."""
    if device_type != "cuda":
        return "sdpa"  # off CUDA the kernel only runs in Triton's interpreter (tests)
    from kernels import HEAD_DIMS  # imported lazily: Triton is only needed on CUDA

    if head_dim not in HEAD_DIMS:
        return "sdpa"
    return "triton" if launch_free or seq_len >= EAGER_TRITON_MIN_SEQ else "sdpa"


def attention(q, k, v, key_padding_mask=None, impl="sdpa", never_empty=False):
    """Multi-head attention with an optional key-padding mask: one function, three implementations.

    q: (B, nh, Tq, hs); k, v: (B, nh, Tk, hs); key_padding_mask: (B, Tk) bool, True = padding (hidden as
    a key) or None. Returns (B, nh, Tq, hs). A query whose keys are all padding gets zeros (never NaN); in
    the model this cannot happen because CLS is always a visible key.
    impl: "math" (readable reference: attention_weights @ v), "sdpa" (torch's scaled_dot_product_attention),
    "triton" (our fused kernel in kernels/), "auto" (attention_impl's choice for this device, sequence length
    and head dim). Only "math" forms the weights; M3AE.attention_maps reads them through attention_weights.
    never_empty=True: the caller guarantees that every sample has a visible key (M3AE: CLS is never padding), so
    "sdpa" skips its guard against all-padding rows (un-hide their keys, then zero their output: one more pass
    over the output in the forward and one in the backward). The other paths need no guard.
    """
    if impl == "auto":
        # traced by torch.compile, or captured into a CUDA graph: Python launches no kernel at run time
        launch_free = torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing())
        impl = attention_impl(q.device.type, launch_free, k.size(-2), q.size(-1))
    if impl == "triton":
        from kernels import masked_attention  # imported lazily: Triton is only needed on this path

        return masked_attention(q, k, v, key_padding_mask)
    if impl == "math":
        return attention_weights(q, k, key_padding_mask) @ v  # (B, nh, Tq, hs)
    if impl != "sdpa":
        raise ValueError(f"unknown attention impl {impl!r}; choose auto, triton, sdpa or math")
    empty_rows = None
    if key_padding_mask is not None and not never_empty:
        key_padding_mask, empty_rows = _unhide_empty_rows(key_padding_mask)
    attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = attend
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
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)  # output laid out [q | k | v], heads contiguous
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


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, ln_eps, gelu):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), gelu)

    def forward(self, x, key_padding_mask=None, impl="sdpa"):
        x = x + self.attn(self.norm1(x), key_padding_mask, impl)  # (B, S, D)
        x = x + self.mlp(self.norm2(x))
        return x


class Transformer(nn.Module):
    """A stack of blocks and a final LayerNorm (used for both the encoder and the decoder)."""

    def __init__(self, dim, depth, num_heads, mlp_ratio, ln_eps, gelu):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, ln_eps, gelu) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=ln_eps)

    def forward(self, x, key_padding_mask=None, impl="sdpa"):
        for block in self.blocks:
            x = block(x, key_padding_mask, impl)  # (B, S, D)
        return self.norm(x)


# -----------------------------------------------------------------------------
# patches and masking


def patchify(images, p):
    """(B, C, H, W) -> (B, N, p*p*C), grid row-major, each patch flattened in (row, col, channel) order."""
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
    """keep = floor(L * (1 - ratio)), as official: 64 of 256 patches and 16 of 64 text slots at 0.75."""
    return int(length * (1.0 - mask_ratio))


def random_masking(batch_size, length, mask_ratio, noise=None, device=None):
    """Per-sample random masking by sorting noise (mae's scheme; official draws one noise row per batch).

    noise: (B, L) floats, the lowest `keep` of each row are kept; None draws uniform noise. Rows that are
    all equal reproduce the official batch-shared mask. Returns
      ids_keep (B, keep): kept positions, in the order they enter the encoder (ascending noise),
      ids_restore (B, L): argsort of the shuffle, so gathering [kept, mask tokens] with it unshuffles,
      mask (B, L) float: 1 = removed, 0 = kept.
    """
    keep = num_kept(length, mask_ratio)
    if noise is None:
        noise = torch.rand(batch_size, length, device=device)
    if noise.shape != (batch_size, length):
        raise ValueError(f"noise must be ({batch_size}, {length}), got {tuple(noise.shape)}")
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch_size, length, device=noise.device)
    mask[:, :keep] = 0
    mask = mask.gather(1, ids_restore)
    return ids_shuffle[:, :keep], ids_restore, mask


def gather_tokens(x, ids):
    """x: (B, L, D), ids: (B, K) -> (B, K, D)."""
    return x.gather(1, ids[:, :, None].expand(-1, -1, x.size(-1)))


def removed_ids(mask, n_removed):
    """The removed positions of each row, in ascending order: mask (B, L) float, 1 = removed, exactly n_removed
    ones per row (as random_masking draws it) -> (B, n_removed) int64. A stable sort puts the kept zeros first."""
    return mask.argsort(dim=1, stable=True)[:, mask.size(1) - n_removed :]


def unshuffle(kept, mask_token, ids_restore):
    """Append mask tokens to the kept tokens (B, keep, D) and undo the shuffle: -> (B, L, D), natural order."""
    B, L = ids_restore.shape
    full = torch.cat([kept, mask_token.expand(B, L - kept.size(1), -1)], dim=1)  # shuffled order
    return gather_tokens(full, ids_restore)


# -----------------------------------------------------------------------------
# losses (paper section 3.3), each averaged per sample first and then over the batch, as official


def image_loss(pred, target, mask, norm_pix=False):
    """MSE over removed patches. pred, target: (B, N, p*p*C) with target = patchify(images); mask (B, N)
    1 = removed. norm_pix normalises each target patch by its own mean and variance (mae's option;
    unbiased variance, eps 1e-6, as mae). A sample with nothing removed contributes 0."""
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    per_sample = (per_patch * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-5)
    return per_sample.mean()


def text_loss(logits, tokens, mask, padding_mask):
    """Cross-entropy over text slots that are removed AND not padding. logits (B, T, V), tokens (B, T),
    mask (B, T) 1 = removed, padding_mask (B, T) True = pad. Per sample: sum / max(n, 1e-5) (official);
    a sample with no such token adds 0 but still counts in the batch mean, so the loss is never NaN."""
    valid = mask * (~padding_mask).float()  # (B, T)
    ce = F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none")  # (B, T)
    per_sample = (ce * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1e-5)
    return per_sample.mean()


# -----------------------------------------------------------------------------
# the model


class M3AE(nn.Module):
    """One ViT encoder over [CLS, visible patches, visible text], an MAE-style decoder over everything.

    The same weights run three modes, chosen by which inputs are given: paired (images and text),
    image-only (text=None: exactly MAE, the paper's baseline) and text-only (images=None).
    """

    def __init__(self, config: M3AEConfig):
        super().__init__()
        self.config = c = config
        D, Dd = c.emb_dim, c.dec_emb_dim
        # encoder inputs: a linear patch projection and a token table (no sqrt(D) scaling, as official)
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
        self.register_buffer("enc_text_pos", sincos_1d(D, torch.arange(c.text_len))[None], persistent=False)
        self.register_buffer("dec_image_pos", sincos_2d(Dd, c.grid_size)[None], persistent=False)
        self.register_buffer("dec_text_pos", sincos_1d(Dd, torch.arange(c.text_len))[None], persistent=False)

        self.encoder = Transformer(D, c.depth, c.num_heads, c.mlp_ratio, c.ln_eps, c.gelu)
        # decoder: one projection shared by CLS, image and text; a mask token per modality
        self.decoder_embed = nn.Linear(D, Dd)
        self.image_mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.text_mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder = Transformer(Dd, c.dec_depth, c.dec_num_heads, c.mlp_ratio, c.ln_eps, c.gelu)
        self.image_head = nn.Linear(Dd, c.patch_dim)  # pixels per patch
        self.text_head = nn.Linear(Dd, c.vocab_size)  # untied from text_embed, as official
        self.reset_parameters()

    def reset_parameters(self):
        # Official init (mae agrees except where noted): xavier-uniform Linear weights (the fused qkv as one
        # matrix), zero biases, LayerNorm 1/0, normal(0.02) for CLS, type embeddings and mask tokens.
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

    def _impl(self):
        return self.config.attn_impl

    # --- embeddings -------------------------------------------------------------------------------

    def embed_image(self, images):
        """(B, C, H, W) -> (B, N, D): patch projection + 2D position + image type (before masking)."""
        return self.patch_embed(patchify(images, self.config.patch_size)) + self.enc_image_pos + self.enc_image_type

    def embed_text(self, text):
        """(B, T) -> (B, T, D): token embedding + 1D position + text type (before masking)."""
        return self.text_embed(text) + self.enc_text_pos[:, : text.size(1)] + self.enc_text_type

    def _check_inputs(self, images, text, text_padding_mask):
        if images is None and text is None:
            raise ValueError("give images, text or both")
        if text is not None:
            if text.size(1) > self.config.text_len:
                raise ValueError(f"text has {text.size(1)} tokens, config.text_len is {self.config.text_len}")
            if text_padding_mask is None:
                text_padding_mask = text == 0  # pad id 0
            if text_padding_mask.dtype != torch.bool or text_padding_mask.shape != text.shape:
                raise ValueError("text_padding_mask must be a bool tensor shaped like text (True = padding)")
        return text_padding_mask

    # --- encoder ----------------------------------------------------------------------------------

    def _encoder_tokens(self, images, text, text_padding_mask, mask=False, image_noise=None, text_noise=None):
        """The encoder's input, before any block: [CLS, patches, text slots], each embedded with its position
        and type. mask=False keeps every token in its natural order (encode, attention_maps); mask=True keeps
        a random subset of each modality in the order random_masking draws it (forward_encoder).
        Returns (x (B, S, D); pad (B, S) bool, True = padding, or None without text; info): info holds the
        text_padding_mask used and, per modality, *_mask (1 = removed) and *_ids_restore (None when absent
        or not masking)."""
        c = self.config
        text_padding_mask = self._check_inputs(images, text, text_padding_mask)
        B = images.size(0) if images is not None else text.size(0)
        device = self.cls_token.device
        xs = [self.cls_token.expand(B, -1, -1)]  # (B, 1, D)
        pads = [torch.zeros(B, 1, dtype=torch.bool, device=device)]  # CLS is never padding
        info = dict(image_mask=None, image_ids_restore=None, text_mask=None, text_ids_restore=None)
        if images is not None:
            x_img = self.embed_image(images)  # (B, N, D)
            if mask:
                ids_keep, info["image_ids_restore"], info["image_mask"] = random_masking(
                    B, x_img.size(1), c.image_mask_ratio, image_noise, device)
                x_img = gather_tokens(x_img, ids_keep)  # (B, keep_img, D)
            xs.append(x_img)
            pads.append(torch.zeros(B, x_img.size(1), dtype=torch.bool, device=device))
        if text is not None:
            x_txt = self.embed_text(text)  # (B, T, D)
            text_pad = text_padding_mask  # (B, T)
            if mask:
                # Padding slots take part in the draw (the paper's keep count includes them); a padding slot
                # that stays visible is hidden as an attention key.
                ids_keep, info["text_ids_restore"], info["text_mask"] = random_masking(
                    B, x_txt.size(1), c.text_mask_ratio, text_noise, device)
                x_txt, text_pad = gather_tokens(x_txt, ids_keep), text_padding_mask.gather(1, ids_keep)  # keep_txt
            xs.append(x_txt)
            pads.append(text_pad)
        x, pad = torch.cat(xs, dim=1), torch.cat(pads, dim=1)  # (B, S, D), (B, S)
        info["text_padding_mask"] = text_padding_mask
        return x, pad if text is not None else None, info

    def forward_encoder(self, images=None, text=None, text_padding_mask=None, image_noise=None, text_noise=None):
        """Mask each modality, then encode [CLS, kept patches, kept text]. Returns a dict with the encoder
        output `x` (B, 1 + keep_img + keep_txt, D) after the final norm, `text_padding_mask` (B, T), and per
        modality `*_mask` (1 = removed) and `*_ids_restore` (None for an absent modality)."""
        x, pad, out = self._encoder_tokens(images, text, text_padding_mask, True, image_noise, text_noise)
        out["x"] = self.encoder(x, pad, self._impl())  # (B, 1 + keep_img + keep_txt, D)
        return out

    # --- decoder ----------------------------------------------------------------------------------

    def forward_decoder(self, enc):
        """Decode, then apply each head to every token. Returns (image_pred (B, N, p*p*C) or None,
        text_logits (B, T, V) or None)."""
        x_img, x_txt = self.decode(enc)
        image_pred = self.image_head(x_img) if x_img is not None else None  # (B, N, p*p*C)
        text_logits = self.text_head(x_txt) if x_txt is not None else None  # (B, T, V)
        return image_pred, text_logits

    def decode(self, enc):
        """Re-insert mask tokens, unshuffle, add decoder positions and types, decode [CLS, all patches,
        all text slots]. Returns the decoder's output per modality, before the heads: (x_img (B, N, Dd) or None,
        x_txt (B, T, Dd) or None)."""
        c = self.config
        x = self.decoder_embed(enc["x"])  # (B, 1 + kept, Dd): one projection for CLS, image and text
        B = x.size(0)
        xs, pads = [x[:, :1]], [torch.zeros(B, 1, dtype=torch.bool, device=x.device)]  # CLS: (B, 1, Dd)
        n_img, start = 0, 1
        if enc["image_ids_restore"] is not None:
            n_img = enc["image_ids_restore"].size(1)
            keep = num_kept(n_img, c.image_mask_ratio)
            x_img = unshuffle(x[:, start : start + keep], self.image_mask_token, enc["image_ids_restore"])
            xs.append(x_img + self.dec_image_pos + self.dec_image_type)  # (B, N, Dd)
            pads.append(torch.zeros(B, n_img, dtype=torch.bool, device=x.device))
            start += keep
        has_text = enc["text_ids_restore"] is not None
        if has_text:
            T = enc["text_ids_restore"].size(1)
            x_txt = unshuffle(x[:, start:], self.text_mask_token, enc["text_ids_restore"])
            xs.append(x_txt + self.dec_text_pos[:, :T] + self.dec_text_type)  # (B, T, Dd)
            pads.append(enc["text_padding_mask"])  # the decoder hides every padding slot (as official)
        x = self.decoder(torch.cat(xs, dim=1), torch.cat(pads, dim=1) if has_text else None, self._impl())
        x = x[:, 1:]  # (B, N [+ T], Dd): the decoder's CLS output is discarded
        return (x[:, :n_img] if n_img else None), (x[:, n_img:] if has_text else None)

    # --- loss and forward -------------------------------------------------------------------------

    def forward_loss(self, images, text, enc, image_pred, text_logits):
        """Weighted sum (section 3.3) and its parts; an absent modality contributes a zero."""
        c = self.config
        zero = enc["x"].new_zeros((), dtype=torch.float32)
        l_img = zero if image_pred is None else image_loss(
            image_pred, patchify(images, c.patch_size), enc["image_mask"], c.norm_pix_loss)
        l_txt = zero if text_logits is None else text_loss(
            text_logits, text, enc["text_mask"], enc["text_padding_mask"])
        return dict(loss=c.image_loss_weight * l_img + c.text_loss_weight * l_txt, image_loss=l_img, text_loss=l_txt)

    def forward_loss_removed(self, images, text, enc, x_img, x_txt):
        """forward_loss's value with each head applied only to the removed tokens, the only ones the loss reads
        (a quarter fewer head rows at mask 0.75, and no (B, T, V) logits for the kept text slots). x_img, x_txt:
        decode's outputs. The removed count per row is fixed by the config, so every shape is static (no host
        sync, one torch.compile graph); removed padding slots are still evaluated, at weight 0, as in text_loss.
        Equal to forward_loss up to float rounding (summation order): tests/test_model.py."""
        c = self.config
        zero = enc["x"].new_zeros((), dtype=torch.float32)
        l_img = l_txt = zero
        if x_img is not None:
            N = x_img.size(1)
            ids = removed_ids(enc["image_mask"], N - num_kept(N, c.image_mask_ratio))  # (B, M)
            pred = self.image_head(gather_tokens(x_img, ids))  # (B, M, p*p*C)
            target = gather_tokens(patchify(images, c.patch_size), ids)  # (B, M, p*p*C)
            l_img = image_loss(pred, target, torch.ones(ids.shape, device=ids.device), c.norm_pix_loss)
        if x_txt is not None:
            T = x_txt.size(1)
            ids = removed_ids(enc["text_mask"], T - num_kept(T, c.text_mask_ratio))  # (B, M)
            logits = self.text_head(gather_tokens(x_txt, ids))  # (B, M, V)
            # cross-entropy on (B*M, V) rows: the class dim stays the last, contiguous one (text_loss's (B, V, T)
            # transpose makes CUDA's log_softmax copy the logits), and dtype=float32 reads bf16 logits without
            # an fp32 copy of them first
            logp = F.log_softmax(logits.flatten(0, 1), dim=-1, dtype=torch.float32)  # (B*M, V)
            ce = F.nll_loss(logp, text.gather(1, ids).flatten(), reduction="none").view(ids.shape)  # (B, M)
            valid = (~enc["text_padding_mask"].gather(1, ids)).float()  # (B, M): removed and not padding
            l_txt = ((ce * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1e-5)).mean()  # as text_loss
        return dict(loss=c.image_loss_weight * l_img + c.text_loss_weight * l_txt, image_loss=l_img, text_loss=l_txt)

    def forward(self, images=None, text=None, text_padding_mask=None, image_noise=None, text_noise=None,
                predictions=True):
        """Masked reconstruction. images (B, 3, H, W) or None; text (B, T) int64 or None; text_padding_mask
        (B, T) bool, True = pad (default: text == 0); *_noise (B, L) fixes the masks (see random_masking).
        Returns a dict: loss, image_loss, text_loss, image_pred, text_logits, image_mask, text_mask.
        predictions=False: the heads run only on the removed tokens (forward_loss_removed), for a caller that
        needs the loss alone (training); image_pred and text_logits are then None."""
        enc = self.forward_encoder(images, text, text_padding_mask, image_noise, text_noise)
        if not predictions:
            out = self.forward_loss_removed(images, text, enc, *self.decode(enc))
            out.update(image_pred=None, text_logits=None, image_mask=enc["image_mask"], text_mask=enc["text_mask"])
            return out
        image_pred, text_logits = self.forward_decoder(enc)
        out = self.forward_loss(images, text, enc, image_pred, text_logits)
        out.update(image_pred=image_pred, text_logits=text_logits, image_mask=enc["image_mask"],
                   text_mask=enc["text_mask"])
        return out

    # --- downstream: the encoder on the whole, unmasked input ---------------------------------------

    def encode(self, images=None, text=None, text_padding_mask=None):
        """Encode without masking, for probes and visualisation. Returns (cls, tokens): cls (B, D) is the
        CLS feature after the final norm (what the paper's linear probe reads); tokens (B, N [+ T], D) are
        the patch (then text) features in their natural order."""
        x, pad, _ = self._encoder_tokens(images, text, text_padding_mask)
        x = self.encoder(x, pad, self._impl())  # (B, 1 + N [+ T], D)
        return x[:, 0], x[:, 1:]

    def attention_maps(self, images=None, text=None, text_padding_mask=None):
        """The encoder's attention weights on the whole, unmasked input (as the paper's Figures 7 and 8):
        a list with one (B, nh, S, S) tensor per layer over the sequence [CLS, patches, text], S = 1 + N [+ T];
        row = query, column = key. Each row sums to 1 and a padded key gets 0. It runs the math path whatever
        config.attn_impl says (SDPA and the fused kernel never form the weights): each block's q and k are
        recomputed from the block's input with the block's own modules. Call it under torch.no_grad() unless
        you want gradients through the maps."""
        x, pad, _ = self._encoder_tokens(images, text, text_padding_mask)  # (B, S, D)
        maps = []
        for block in self.encoder.blocks:
            q, k, _ = block.attn.heads(block.norm1(x))  # (B, nh, S, hs) each
            maps.append(attention_weights(q, k, pad))  # (B, nh, S, S)
            x = block(x, pad, "math")  # (B, S, D)
        return maps


# -----------------------------------------------------------------------------
# checkpoints: a dict with at least "model" (state_dict) and "config" (the M3AEConfig fields as a dict);
# train.py adds optimizer, schedule, step and RNG states. Everything loads with torch.load(weights_only=True).


def checkpoint_dict(model, **extra):
    return {"model": model.state_dict(), "config": asdict(model.config), **extra}


def load_model(path, map_location="cpu", **config_overrides):
    """Build an M3AE from a checkpoint written by train.py or convert.py. Returns (model, checkpoint)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = M3AE(M3AEConfig(**{**ckpt["config"], **config_overrides}))
    model.load_state_dict(ckpt["model"])
    return model, ckpt


def count_parameters(config):
    """Parameter counts by part, computed on the meta device (no memory, any preset)."""
    with torch.device("meta"):
        model = M3AE(config)
    n = lambda module: sum(p.numel() for p in module.parameters())
    image_in = n(model.patch_embed) + model.cls_token.numel() + model.enc_image_type.numel()
    counts = {
        "encoder (ViT image path)": n(model.encoder) + image_in,
        "text embedding + type": n(model.text_embed) + model.enc_text_type.numel(),
        "decoder (with heads, mask tokens)": n(model) - n(model.encoder) - image_in - n(model.text_embed)
        - model.enc_text_type.numel(),
    }
    counts["total"] = n(model)
    return counts


if __name__ == "__main__":
    # `python model.py`: parameter counts per preset. ViT-B/16 encoder: about 86M, as in the ViT paper.
    for name in PRESETS:
        cfg = make_config(name)
        parts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in count_parameters(cfg).items())
        print(f"{name:>5} ({cfg.emb_dim}/{cfg.depth}/{cfg.num_heads}, {cfg.image_size}px/{cfg.patch_size}, "
              f"vocab {cfg.vocab_size}): {parts}")
