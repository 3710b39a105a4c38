import torch

# Two threads, as on CI; tests compare numbers, never timings.
torch.set_num_threads(min(2, torch.get_num_threads()))
