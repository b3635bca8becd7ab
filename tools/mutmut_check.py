#!/usr/bin/env python
"""A second, independent view of the tests: mutmut (a standard mutation tool) over the pure modules that
pyproject.toml's [tool.mutmut] names, with a written budget of the mutants each module may leave uncaught.

Besides the planted bugs of tools/mutation_check.py (one per claim, chosen by hand), mutmut makes every small change
it can (operators, constants, conditions, arguments) and runs the tests that reach the changed function. Some of its
survivors are equivalent (a tolerance in a numerical routine, a default nobody passes); the budget in
tools/mutmut_budget.json holds the counts measured when it was last lowered, per module, so a change that adds
survivors or untested code fails here. Prints the table, and exits 1 over budget.

    .venv/bin/python tools/mutmut_check.py            # run mutmut, then check
    .venv/bin/python tools/mutmut_check.py --no-run   # check the results of the last run
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET = REPO / "tools" / "mutmut_budget.json"
MUTMUT = str(Path(sys.executable).parent / "mutmut")  # the console script installed beside this interpreter
UNCAUGHT = ("survived", "no tests")
"""The statuses counted against the budget: changes the tests let through, and code no selected test reaches."""


def results() -> dict[str, Counter]:
    """Per module, how many of mutmut's mutants ended in each status (mutmut's `results --all true`)."""
    out = subprocess.run([MUTMUT, "results", "--all", "true"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    counts: dict[str, Counter] = {}
    for line in out.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if not name:
            continue
        module = name.split(".x_")[0].split(".xǁ")[0]  # mutmut names a mutant <module>.x_<function>__mutmut_<n>
        counts.setdefault(module, Counter())[status] += 1
    return counts


def main(argv: list[str]) -> int:
    if "--no-run" not in argv:
        log = REPO / "mutants" / "mutmut.log"
        log.parent.mkdir(exist_ok=True)
        with log.open("w") as f:  # mutmut redraws a progress line per mutant: kept out of the CI log
            proc = subprocess.run([MUTMUT, "run"], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            print(f"mutmut run failed (exit {proc.returncode}); see {log}", file=sys.stderr)
            return 1
    budget = json.loads(BUDGET.read_text())
    counts = results()
    over = []
    print("| module | mutants | killed | survived (budget) | no tests (budget) |\n|---|---|---|---|---|")
    for module in sorted(set(counts) | set(budget)):
        c, b = counts.get(module, Counter()), budget.get(module, {})
        cells = []
        for status in UNCAUGHT:
            limit = b.get(status, 0)
            cells.append(f"{c[status]} ({limit})")
            if c[status] > limit:
                over.append(f"{module}: {c[status]} {status}, budget {limit}")
        print(f"| {module} | {sum(c.values())} | {c['killed']} | {' | '.join(cells)} |")
    for line in over:
        print(f"over budget: {line}", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
