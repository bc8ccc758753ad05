"""Weight conversion between the official JAX M3AE (young-geng/m3ae_public) and model.py.

Official parameters are flax names joined with "/" (e.g. "encoder/Block_0/Attention_0/Dense_0/kernel");
a flax Dense kernel is (in, out), the transpose of a torch Linear weight.
"""

import re

import numpy as np
import torch

# (official regex, our name template). Applied to the name without its leaf ("kernel", "scale", ...).
_BLOCK = r"(encoder|decoder)/Block_(\d+)/"
OFFICIAL_TO_OURS = [
    (r"cls_token", "cls_token"),
    (r"encoder_image_type_embedding", "enc_image_type"),
    (r"encoder_text_type_embedding", "enc_text_type"),
    (r"decoder_image_type_embedding", "dec_image_type"),
    (r"decoder_text_type_embedding", "dec_text_type"),
    (r"image_mask_embedding", "image_mask_token"),
    (r"text_mask_embedding", "text_mask_token"),
    (r"image_embedding", "patch_embed"),
    (r"text_embedding", "text_embed"),
    (_BLOCK + r"LayerNorm_0", r"\1.blocks.\2.norm1"),
    (_BLOCK + r"Attention_0/Dense_0", r"\1.blocks.\2.attn.qkv"),
    (_BLOCK + r"Attention_0/Dense_1", r"\1.blocks.\2.attn.proj"),
    (_BLOCK + r"LayerNorm_1", r"\1.blocks.\2.norm2"),
    (_BLOCK + r"TransformerMLP_0/fc1", r"\1.blocks.\2.mlp.fc1"),
    (_BLOCK + r"TransformerMLP_0/fc2", r"\1.blocks.\2.mlp.fc2"),
    (r"(encoder|decoder)/LayerNorm_0", r"\1.norm"),
    (r"decoder_input_projection", "decoder_embed"),
    (r"decoder_image_output/Dense_0", "image_head"),
    (r"decoder_text_output/Dense_0", "text_head"),
]
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


def official_name_to_ours(name):
    """'encoder/Block_0/Attention_0/Dense_0/kernel' -> 'encoder.blocks.0.attn.qkv.weight'."""
    stem, _, leaf = name.rpartition("/")
    if not stem:  # a bare parameter such as cls_token
        stem, leaf = leaf, None
    for pattern, template in OFFICIAL_TO_OURS:
        if re.fullmatch(pattern, stem):
            ours = re.sub(pattern, template, stem)
            return ours if leaf is None else f"{ours}.{_LEAVES[leaf]}"
    raise KeyError(f"unknown official parameter {name!r}")


def official_to_state_dict(params):
    """{official flat name: array} -> {our name: float32 tensor}; Dense kernels are transposed."""
    state = {}
    for name, value in params.items():
        ours = official_name_to_ours(name)
        if ours in state:
            raise KeyError(f"two official parameters map to {ours!r}")
        value = np.asarray(value, dtype=np.float32)
        if name.endswith("/kernel"):
            value = value.T
        state[ours] = torch.from_numpy(np.ascontiguousarray(value))
    return state


def config_from_official(official, **overrides):
    """Our config for an official config dict (the keys of m3ae_public's get_default_config).

    Official numerics are GELU tanh, LayerNorm eps 1e-6 and per-sample loss averaging: our defaults too."""
    from model import M3AEConfig

    keys = ("image_size", "patch_size", "vocab_size", "text_len", "emb_dim", "depth", "num_heads", "dec_emb_dim",
            "dec_depth", "dec_num_heads", "mlp_ratio", "image_mask_ratio", "text_mask_ratio")
    fields = {k: official[k] for k in keys if k in official}
    return M3AEConfig(**{**fields, "gelu": "tanh", "ln_eps": 1e-6, **overrides})
