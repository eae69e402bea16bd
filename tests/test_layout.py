"""The package's shape (issue 19): test support lives outside it."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.mark.parametrize("name", ["loopback", "reference"])
def test_test_support_is_not_part_of_the_package(name):
    assert importlib.util.find_spec(f"dali_arb.{name}") is None, f"dali_arb.{name} ships test support to users"
    assert importlib.util.find_spec(f"support.{name}") is not None
