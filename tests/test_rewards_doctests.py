"""The examples in the rewards' docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = ["registry", "checks", "columns", "masks", "meteor", "cycle", "wordnet"]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    mod = importlib.import_module(f"sa2va_trl.rewards.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"sa2va_trl.rewards.{module} has no docstring example"
    assert result.failed == 0
