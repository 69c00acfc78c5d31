"""Why each surviving mutant of the last ``just mutants`` run survives (read one by one).

A rule is (function, text in the removed lines, text in the added lines, verdict, why):
it names the change, not mutmut's number, so it outlives renumbering. ``function`` "*"
matches any function. The verdicts:

- "equivalent": no caller can tell the mutant from the original (not counted in the
  caught share of the non-equivalent mutants);
- "missed": a caller could; the machines do not check it, for the reason given.

tests/mutants/report.py applies them (after the kinds it recognises from the diff alone)
and writes the table of mutants/survivors.md; docs/mutation-survivors.md is that table.
"""

from __future__ import annotations

EQ, MISSED = "equivalent", "missed"

RULES: list[tuple[str, str, str, str, str]] = [
]
