"""pytest set-up: one CPU thread."""

from __future__ import annotations

import torch

# One thread: the tests' tensors are tiny, and OpenMP threads spinning against any other
# process on a 2-core machine cost 10-50x (measured here under load).
torch.set_num_threads(1)
