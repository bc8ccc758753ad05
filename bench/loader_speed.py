"""Images/s of train.py's input pipeline alone (no model): the same flags, the same dataset, DataLoader and
workers as a training run, timed over --batches global batches after the first (worker start-up excluded).

    python bench/loader_speed.py --batches 20 -- --wds-shards 'shards/{00000..00015}.tar' --epoch-samples 5120 \
        --batch-size 256 --tokenizer run/tokenizer.model --out-dir /tmp/x

Everything after `--` goes to train.py's parser (so a flag it refuses is refused here the same way). Compare
the rate with the training run's images/s: if they are close, the input pipeline is what limits the run.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # train.py, data.py, ...

import loader  # noqa: E402
import train  # noqa: E402
from util import make_parser  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = make_parser(__doc__)
    p.add_argument("--batches", type=int, default=20, help="global batches timed after the first")
    ours = p.parse_args(argv[:split])
    run, config, init, _ = train.settings(argv[split + 1 :])
    env = loader.setup(run.device, run.dtype, compile=False)
    sources = train.open_sources(run, config.image_size, init)
    dataset, _ = train.build_datasets(run, sources, train.make_tokenizer(run, sources, init), config)
    feed = loader.make_loader(dataset, run.batch_size, run.workers, env, run.seed)
    batches, _ = loader.epoch_batches(feed, 0, 0, run.batch_size, env, run.seed, run.epoch_samples, run.batch_size)
    next(batches)  # workers start, shuffle buffers fill
    t0 = time.perf_counter()
    for _ in range(ours.batches):
        next(batches)
    rate = ours.batches * run.batch_size / (time.perf_counter() - t0)
    print(f"input pipeline alone: {rate:.0f} images/s ({run.workers} workers, batch {run.batch_size}, "
          f"{config.image_size} px, {ours.batches} batches after the first)")
    return rate


if __name__ == "__main__":
    main()
