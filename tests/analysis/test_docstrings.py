"""The examples in the analysis modules' docstrings run and give what they show."""

from __future__ import annotations

import doctest

import pytest

from unetseg.analysis import grid, matching, report


@pytest.mark.parametrize("module", [grid, matching, report], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0
