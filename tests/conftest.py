"""Shared test fixtures: devices to run on (CUDA cases skip without a GPU)."""

import pytest
import torch

import lowrank_ext

CUDA_OK = torch.cuda.is_available() and lowrank_ext.has_cuda_kernels()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and CUDA kernels"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
