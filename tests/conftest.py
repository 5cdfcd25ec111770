"""Fixtures shared by the test modules: the tiny tokenizer and the tiny random Llama (tests/helpers_tiny.py)."""

import pytest
from helpers_tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok)
