"""Epoch-boundary cost of the pretraining DataLoader: a new loader per epoch (train.py before) vs one persistent
loader (loader.py now). Data only, no model: the time to the first batch of each epoch vs the median batch."""
import os, statistics, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # train.py, data.py, ...
import torch
import data, loader
from tokenizer import load_tokenizer
from util import make_parser, mix_seed

p = make_parser(__doc__ + "\n    ROOT=runs/realdata python bench/boundary.py runs/u2/tokenizer.model")
p.add_argument("tokenizer", help="any tokenizer.model, e.g. from a train.py run on these shards")
args = p.parse_args()
root = os.environ.get("ROOT", "runs/realdata")  # where docs/realdata/build.sh put the sets
shards = f"{root}/captions/wds/{{00000..00006}}.tar"
tok = load_tokenizer(args.tokenizer)
env = loader.Env(0, 1, torch.device("cpu"), None, False)
B, workers, steps_per_epoch, epochs = 64, 2, 8, 4
def dataset():
    return data.WebDatasetShards(shards, tokenizer=tok, text_len=24, transform=data.PretrainTransform(32, data.CC12M_MEAN, data.CC12M_STD))

def run(persistent):
    ds = dataset()
    loader = loader.make_loader(ds, B, workers, env, 0) if persistent else None
    firsts, others = [], []
    for epoch in range(epochs):
        t = time.perf_counter()
        if persistent:
            it, _ = loader.epoch_batches(loader, epoch, 0, B, env, 0, steps_per_epoch * B, B)
        else:  # the old way: a new DataLoader (and new workers) every epoch
            ds.set_epoch(mix_seed(epoch, 0))
            it = iter(torch.utils.data.DataLoader(ds, batch_size=B, collate_fn=data.collate, num_workers=workers, drop_last=True))
        for k in range(steps_per_epoch):
            next(it)
            now = time.perf_counter()
            (firsts if k == 0 else others).append(now - t)
            t = now
        del it
    return statistics.median(firsts[1:]), statistics.median(others)

for persistent in (False, True, False, True):
    f, o = run(persistent)
    print(f"{'persistent loader' if persistent else 'new loader per epoch'}: first batch of an epoch {f*1e3:.0f} ms, other batches {o*1e3:.0f} ms (median; B={B}, workers={workers}, 32 px)")
