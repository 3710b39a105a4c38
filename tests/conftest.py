import os

import torch

# Two threads, as on CI; tests compare numbers, never timings.
torch.set_num_threads(min(2, torch.get_num_threads()))

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. triton.jit reads
# this when a kernel is decorated, so it is set here, before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
