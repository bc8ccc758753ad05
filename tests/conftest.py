import os
import sys

import torch

# Without a GPU, the Triton kernels in kernels/ run on CPU tensors in Triton's interpreter. Triton reads
# this when kernels are defined, so it is set here, before any test imports triton or kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Let tests import the top-level scripts (model.py, data.py, ...) as modules, from any working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
