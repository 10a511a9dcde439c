"""conftest.require: an optional test dependency skips on a developer's machine and fails with CI=true."""

import json

import conftest
import pytest
from conftest import require


def test_present_module_is_returned():
    assert require("json") is json
    assert require("pytest", pytest.__version__) is pytest


@pytest.mark.parametrize("in_ci,outcome", [(False, pytest.skip.Exception), (True, pytest.fail.Exception)])
def test_missing_or_other_version_skips_locally_and_fails_in_ci(monkeypatch, in_ci, outcome):
    monkeypatch.setattr(conftest, "IN_CI", in_ci)
    with pytest.raises(outcome, match=r"needs no_such_module_lrx==1.0, which is not importable"):
        require("no_such_module_lrx", "1.0")
    with pytest.raises(outcome, match=rf"pins pytest==0.0.1 \(.*\), found {pytest.__version__}"):
        require("pytest", "0.0.1")
    if in_ci:
        with pytest.raises(outcome, match="CI=true installs the pinned test dependencies"):
            require("no_such_module_lrx")


def test_ci_env_values():
    for value, expected in (("true", True), ("1", True), ("TRUE", True), ("", False), ("false", False)):
        assert conftest.ci_from_env({"CI": value}) is expected
    assert conftest.ci_from_env({}) is False
