"""Shared fixtures: fixed seeds, Pyro validation on, tiny models and tokenizers."""

import pyro
import pytest
import torch

from bora_pyro.testing import char_tokenizer, tiny_causal_lm


@pytest.fixture(autouse=True)
def _seed_and_validate():
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield


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
