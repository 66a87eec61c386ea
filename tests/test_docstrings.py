"""The examples in the public API's docstrings run and print what they show."""

import doctest
import importlib

import pytest

MODULES = [
    "ferrograd",
    "ferrograd.dsl.model",
    "ferrograd.dsl.init",
    "ferrograd.ir.autodiff",
    "ferrograd.ir.interpret",
    "ferrograd.codegen.lower",
    "ferrograd.codegen.step",
    "ferrograd.codegen.gradcheck",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0
