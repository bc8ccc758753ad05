"""The output heads and the loss alone, forward + backward: every token through the heads (M3AE.forward_loss on
forward_decoder's outputs, what training runs today) against the removed tokens only (forward_loss_removed,
M3AE.forward(predictions=False)). Decoder outputs are random leaves, so nothing else is timed.

    python bench/heads_bench.py                        # CUDA: base, batch 256, vocab 30522, bf16 autocast
    python bench/heads_bench.py --device cpu --batch 8 # CPU: fp32

Half-length captions (as train.py --bench). Times: medians of --repeats interleaved runs after one warm-up each.
"""

import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # model.py

from model import M3AE, make_config  # noqa: E402
from util import make_parser  # noqa: E402


def main(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="base")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--vocab", type=int, default=30522, help="30522: BERT's, the paper's tokenizer")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    c = make_config(args.preset, vocab_size=args.vocab, attn_impl="sdpa")
    model, B = M3AE(c).to(device), args.batch
    images = torch.randn(B, 3, c.image_size, c.image_size, device=device)
    text = torch.randint(1, c.vocab_size, (B, c.text_len), device=device)
    text[:, c.text_len // 2 :] = 0
    with torch.no_grad():
        enc = model.forward_encoder(images, text)  # the masks and padding the losses read
    x_img = torch.randn(B, c.num_patches, c.dec_emb_dim, device=device, requires_grad=True)
    x_txt = torch.randn(B, c.text_len, c.dec_emb_dim, device=device, requires_grad=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    def full():
        with autocast:
            return model.forward_loss(images, text, enc, model.image_head(x_img), model.text_head(x_txt))["loss"]

    def removed():
        with autocast:
            return model.forward_loss_removed(images, text, enc, x_img, x_txt)["loss"]

    def timed(f):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        f().backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    paths = {"every token (today)": full, "removed tokens only": removed}
    for f in paths.values():
        timed(f)  # warm-up
    times = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, f in paths.items():
            times[name].append(timed(f))
    print(f"heads + loss, forward + backward: {args.preset}, batch {B}, vocab {args.vocab}, device {device}"
          f"{', bf16 autocast' if cuda else ', fp32'}")
    for name, t in times.items():
        print(f"  {name}: median {statistics.median(t) * 1e3:.2f} ms, min {min(t) * 1e3:.2f} ms "
              f"({args.repeats} runs, interleaved)")
    return {name: statistics.median(t) for name, t in times.items()}


if __name__ == "__main__":
    main()
