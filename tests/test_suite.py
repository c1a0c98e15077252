"""The suite's own set-up: the pytest-xdist groups of the end-to-end tests (tests/conftest.py)."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.e2e  # grouped like the tests it checks


def test_each_grouped_test_carries_its_group_into_the_worker(request):
    """`--dist loadgroup` reads a test's group from the `@group` end of its id, which
    pytest-xdist adds in each worker. When it cannot (pytest 9.2 with xdist 3.8: see
    pyproject.toml), every worker builds every reproduced repository and nothing else says so."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        pytest.skip("checks pytest-xdist workers; this run has none (-n 0)")
    grouped = {
        item.nodeid: mark.args[0]
        for item in request.session.items
        for mark in item.iter_markers("xdist_group")
    }
    assert request.node.nodeid in grouped  # this test is grouped too, so never vacuous
    for nodeid, group in grouped.items():
        assert nodeid.endswith(f"@{group}"), nodeid
