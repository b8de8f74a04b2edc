"""The test run's own setup: the suite relies on pytest-xdist's ``--dist loadgroup`` (addopts) so that
a group's expensive fixtures (the session's trained MNIST CNN, each benchmark's smoke run) are built by
one worker; when a pytest/xdist combination silently stops grouping, every worker builds them and the
suite takes minutes longer without failing. This test makes that loud."""

import pytest

pytestmark = pytest.mark.xdist_group("suite_setup")


def test_xdist_groups_are_honoured(request):
    config = request.config
    if not hasattr(config, "workerinput") or not getattr(config.option, "loadgroup", False):
        pytest.skip("not a pytest-xdist worker under --dist loadgroup")
    assert request.node.nodeid.endswith("@suite_setup"), (
        f"pytest {pytest.__version__} with this pytest-xdist ignores xdist_group marks (nodeid "
        f"{request.node.nodeid!r}; pytest 9.2 does, pytest-dev/pytest-xdist#1386): install the dev extra's "
        "pytest (pytest<9.2)")
