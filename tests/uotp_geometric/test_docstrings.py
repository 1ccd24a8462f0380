r"""The Examples blocks of the public docstrings run as written."""
import doctest

import pytest

from uotp_geometric import aggr, functional


@pytest.mark.parametrize('module', [functional, aggr])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
