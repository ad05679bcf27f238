"""Test set-up: Triton kernels run on CPU tensors through the interpreter when there is no GPU."""

import os

import torch

# Triton reads this when a kernel module is first imported, so it must precede every lldif_kernels import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
