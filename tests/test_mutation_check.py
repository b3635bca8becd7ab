"""The mutation check finds its code by function, in the syntax tree: every listed mutant applies to the package as it
is, and a mutant whose function is gone, whose text lies outside its function, or whose replacement is a no-op is
refused rather than counted."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("mutation_check", REPO / "tools" / "mutation_check.py")
mc = importlib.util.module_from_spec(spec)
sys.modules["mutation_check"] = mc  # its dataclasses look their module up there
spec.loader.exec_module(mc)

SOURCE = '''
X = 1


class A:
    def f(self):
        return X + 1

    @staticmethod
    def g():
        def inner():
            return 2
        return inner()


def h():
    return X + 1
'''


def _m(function: str, find: str, replace: str) -> "mc.Mutant":
    return mc.Mutant("m", "claim", "mod.py", function, find, replace, ("tests/x.py",))


def test_every_listed_mutant_applies_to_the_package_as_it_is():
    assert len(mc.MUTANTS) >= 30 and len({m.name for m in mc.MUTANTS}) == len(mc.MUTANTS)
    for m in mc.MUTANTS:
        mutated = mc.mutate((REPO / m.path).read_text(), m)
        assert mutated != (REPO / m.path).read_text(), m.name


def test_a_mutant_is_located_by_its_function_only():
    # "return X + 1" appears in A.f and in h: each function's own copy is the one changed
    assert "return X + 2" in mc.mutate(SOURCE, _m("A.f", "return X + 1", "return X + 2")).split("def h")[0]
    assert mc.mutate(SOURCE, _m("h", "return X + 1", "return X + 2")).split("def h")[0] == SOURCE.split("def h")[0]
    assert "return 3" in mc.mutate(SOURCE, _m("A.g.inner", "return 2", "return 3"))


@pytest.mark.parametrize("function, find, replace, why", [
    ("A.missing", "return X + 1", "return 0", "no function A.missing in mod.py"),
    ("A", "return X + 1", "return 0", "no function A in mod.py"),  # a class is not a function
    ("A.g", "X = 1", "X = 2", "A.g in mod.py holds the text 0 times"),  # the text is elsewhere in the module
    ("h", "return X + 1", "return  X + 1  # same", "a no-op"),
])
def test_a_mutant_that_no_longer_applies_is_refused(function, find, replace, why):
    with pytest.raises(ValueError, match=why):
        mc.mutate(SOURCE, _m(function, find, replace))


def test_every_claim_row_has_its_mutant_and_every_mutant_its_row():
    assert mc.claims_problems() == []
    text = mc.CLAIMS.read_text()
    first = mc.MUTANTS[0]
    assert mc.claims_problems(text.replace(f"`{first.name}`", "`nothing-planted`")) == [
        "CLAIMS.md: row names no known mutant: nothing-planted", f"CLAIMS.md: no row for mutant {first.name}"]
    assert mc.claims_problems(text.replace(first.tests[0], "tests/x.py::test_y")) == [
        f"CLAIMS.md: the row of {first.name} names other tests than its mutant"]
