"""Test-wide settings. TRITON_INTERPRET must be set before any @triton.jit decorator runs,
so before llc_fast is imported: on machines without a GPU, Triton kernels run in the interpreter."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)  # CI has 2 cores; other processes share them
