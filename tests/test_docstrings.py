"""Docstring examples run: doctest over every module of the `theorax` package (tests/ excluded), one case each.

A module's examples run in a copy of its own globals (the names a reader of that module has in scope), with
ELLIPSIS and NORMALIZE_WHITESPACE; an example whose output is not shown must print nothing. A module that needs
a peer only the `interop` extra installs (torch, diffusers) is skipped where that peer is missing.
"""

import doctest
import importlib
import importlib.util
import pkgutil

import pytest
import theorax

OPTIONAL = ("torch", "diffusers")
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def module_names() -> list[str]:
    """`theorax` and every module below it, except the test suite."""
    names = ["theorax"]
    for info in pkgutil.iter_modules(theorax.__path__, "theorax."):
        if info.name == "theorax.tests":
            continue
        names.append(info.name)
        if info.ispkg:
            package = importlib.import_module(info.name)
            # A subpackage that fails to import is still listed above or here, and fails its own case.
            walk = pkgutil.walk_packages(package.__path__, info.name + ".", onerror=lambda _: None)
            names += [sub.name for sub in walk]
    return sorted(names)


@pytest.mark.parametrize("name", module_names())
def test_docstring_examples_run(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name in OPTIONAL and importlib.util.find_spec(e.name) is None:
            pytest.skip(f"{name} needs {e.name} (the interop extra)")
        raise
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    out: list[str] = []
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
        runner.run(test, out=out.append)
    if runner.failures:
        pytest.fail(
            f"{name}: {runner.failures} of {runner.tries} docstring examples failed\n{''.join(out)}",
            pytrace=False,
        )
