import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Without a GPU, Triton kernels run in the interpreter on CPU tensors (must be
    # set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
