"""Fixtures of the data tests (the tokenizer here has a ``<s>`` BOS token, see helpers)."""

import pytest

from tests.data.helpers import make_frame, make_tokenizer


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def frame():
    return make_frame()
