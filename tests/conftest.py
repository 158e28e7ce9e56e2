"""Shared fixtures: fixed seeds, Pyro validation on, tiny models and tokenizers."""

import pyro
import pytest
import torch

from bora_pyro.testing import char_tokenizer, tiny_causal_lm


@pytest.fixture(autouse=True)
def _seed_validate_and_threads(request):
    """Fixed seeds, Pyro validation on, and one thread for the tiny models (their ops are too
    small to share; two threads per op only cost synchronisation). The real default model keeps
    torch's default."""
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("default_model") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_lm(request):
    return tiny_causal_lm(request.param)


def assert_close(actual, expected, *, rtol=1e-5, atol=1e-6, msg=""):
    """One comparison helper for the whole suite (tensors, arrays or floats)."""
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=rtol, atol=atol, msg=msg or None,
    )
