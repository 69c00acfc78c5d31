"""Summarise a ``mutmut run`` (``just mutants``): per module, how many mutants the state
machines caught, how many survived and how many no machine runs; then every survivor with
its diff (``mutmut show``), for docs/testing.md. Writes ``mutants/report.json``.

    uv run --group mutants python -m tests.mutants.report [--no-diff]
"""

from __future__ import annotations

import ast
import collections
import difflib
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MUTANTS = Path(os.environ.get("MUTANTS_DIR", ROOT / "mutants"))  # mutmut's working copy and results
CAUGHT = {1, 3, 36, 24, -24, 152, 255}  # killed (a failing check), or timed out (a hang the limit caught)
SURVIVED, NO_TESTS = {0}, {5, 33}


def load() -> dict[str, dict[str, int | None]]:
    out = {}
    for meta in sorted((MUTANTS / "scheduler").rglob("*.py.meta")):
        module = str(meta.relative_to(MUTANTS)).removesuffix(".meta")
        out[module] = json.loads(meta.read_text())["exit_code_by_key"]
    return out


def main(argv: list[str]) -> int:
    data = load()
    if not data:
        print("no mutmut results under mutants/: run `just mutants` first")
        return 1
    table, survivors = {}, []
    print(f"{'module':38} {'mutants':>7} {'caught':>7} {'survived':>8} {'no machine':>10} {'caught share':>12}")
    for module, codes in data.items():
        counts = collections.Counter("caught" if c in CAUGHT else "survived" if c in SURVIVED else
                                     "no machine" if c in NO_TESTS else "not run" for c in codes.values())
        run = counts["caught"] + counts["survived"] + counts["no machine"]
        share = counts["caught"] / run if run else 0.0
        table[module] = {**{k: counts[k] for k in ("caught", "survived", "no machine", "not run")},
                         "mutants": len(codes), "share": round(share, 3)}
        print(f"{module:38} {len(codes):7} {counts['caught']:7} {counts['survived']:8} {counts['no machine']:10} {share:11.1%}"
              + (f"  ({counts['not run']} not run)" if counts["not run"] else ""))
        survivors += [name for name, c in codes.items() if c in SURVIVED]
    (MUTANTS / "report.json").write_text(json.dumps({"modules": table, "survivors": survivors}, indent=1))
    print(f"\n{len(survivors)} survivors")
    verdicts: collections.Counter[str] = collections.Counter()
    rows = []
    for name in survivors:
        if "--no-diff" in argv:
            print(name)
            continue
        diff = show(name)
        verdict, why = classify(name, diff)
        verdicts[(name.split(".xǁ")[0].split(".x_")[0], verdict)] += 1
        rows.append((name, diff, verdict, why))
        print(f"[{verdict}: {why}] # {name}\n{diff.rstrip()}")
    if rows:
        print()
        for module in table:
            dotted = module.removesuffix(".py").replace("/", ".")
            equivalent = verdicts[(dotted, "equivalent")]
            run = table[module]["caught"] + table[module]["survived"] + table[module]["no machine"]
            if run:
                share = table[module]["caught"] / (run - equivalent) if run > equivalent else 0.0
                print(f"{module}: {equivalent} equivalent, {verdicts[(dotted, 'missed')]} missed, "
                      f"{verdicts[(dotted, 'unclassified')]} unclassified: caught {table[module]['caught']} of "
                      f"{run - equivalent} non-equivalent = {share:.1%}")
        (MUTANTS / "survivors.md").write_text(survivor_table(rows))
        print("the survivors, one row each: mutants/survivors.md")
    return 0


@functools.cache
def _functions(module: str) -> dict[str, str]:
    """Every function of mutmut's copy of ``module`` (``mutants/<path>``), by name, as source."""
    path = MUTANTS / (module.replace(".", "/") + ".py")
    lines = path.read_text().splitlines()
    return {node.name: "\n".join(lines[node.lineno - 1 : node.end_lineno]) for node in ast.walk(ast.parse("\n".join(lines)))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def show(name: str) -> str:
    """What ``mutmut show`` prints for a mutant (its diff against the original function),
    read from mutmut's copy of the module: about 2 s less per mutant than ``mutmut show``."""
    module, _, function = name.rpartition(".")
    functions = _functions(module)
    original = function.rpartition("__mutmut_")[0] + "__mutmut_orig"
    if function not in functions or original not in functions:
        shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=ROOT, capture_output=True, text=True)
        return shown.stdout or f"{name}: {shown.stderr.strip()}"
    path = module.replace(".", "/") + ".py"
    old = functions[original].replace(original, "").splitlines()
    new = functions[function].replace(function, "").splitlines()
    return "\n".join(difflib.unified_diff(old, new, f"{path}", f"{path}", lineterm="", n=1))


def _spans(path: Path) -> dict[str, list[tuple[int, int]]]:
    """Line spans of the log calls (``event(...)``, ``log.x(...)``) and of the metric
    updates (``self._metrics...``) in a source file."""
    tree = ast.parse(path.read_text())
    spans: dict[str, list[tuple[int, int]]] = {"log text": [], "metric": []}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func == "event" or func.startswith("log."):
                spans["log text"].append((node.lineno, node.end_lineno or node.lineno))
            elif "_metrics." in func:
                spans["metric"].append((node.lineno, node.end_lineno or node.lineno))
    return spans


REDIS_WORDS = {"GET", "SET", "DEL", "EXISTS", "INCRBY", "HGET", "HSET", "HMGET", "HGETALL", "HKEYS", "HDEL", "SMEMBERS",
               "SADD", "SREM", "SCARD", "ZADD", "ZREM", "ZRANGE", "ZRANGEBYSCORE", "ZSCORE", "EXPIRE", "PING",
               "-INF", "+INF", "LIMIT", "WITHSCORES", "NX", "XX", "PX", "EX"}
CODECS = {"ASCII", "UTF-8", "UTF8"}
STRICT = re.compile(r",\s*strict=(True|False|None)\)|,\s*\)")


def _equivalent(removed: list[str], added: list[str]) -> str | None:
    """The kinds of survivor no caller can tell from the original, by their diff alone:
    a Redis command or keyword in another case (Redis reads them case-insensitively), a
    codec name in another case (Python's codec lookup ignores case), ``zip(...,
    strict=True)`` made lax where the sequences are equal in length by construction, and
    the message of an assertion that never fails."""
    if len(removed) != 1 or len(added) != 1:
        return None
    old, new = removed[0], added[0]
    if old != new and old.lower() == new.lower():
        pairs = [(a, b) for a, b in zip(re.findall(r'"([^"]*)"', old), re.findall(r'"([^"]*)"', new), strict=False) if a != b]
        if pairs and all(a.upper() in REDIS_WORDS for a, _ in pairs):
            return "Redis reads command names and keywords in any case"
        if pairs and all(a.upper() in CODECS for a, _ in pairs):
            return "Python's codec lookup ignores case"
    if "zip(" in old and "strict=True" in old and STRICT.sub(")", old) == STRICT.sub(")", new):
        return "zip's strictness: the sequences are equal in length by construction"
    if old.startswith("assert ") and new.startswith("assert ") and old.split(",")[0] == new.split(",")[0]:
        return "the text of an assertion that never fails"
    return None


def _changed(diff: str) -> tuple[list[str], list[str]]:
    removed = [line[1:].strip() for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return removed, added


def function_of(name: str) -> str:
    """``scheduler.placement.dispatcher.xǁDispatcherǁ_place__mutmut_7`` -> ``_place``."""
    last = name.rpartition(".")[2].rpartition("__mutmut_")[0]
    return last.rpartition("ǁ")[2] if "ǁ" in last else last.removeprefix("x_")


def classify(name: str, diff: str) -> tuple[str, str]:
    """(verdict, why) of a survivor: "equivalent" (no caller can tell it from the
    original), "missed" (a caller could: the machines' blind spot, with the reason), or
    "unclassified" (nobody has read it yet). By the equivalent kinds found from the diff
    alone, then the rules of tests/mutants/verdicts.py (function, changed text)."""
    from tests.mutants.verdicts import RULES

    removed, added = _changed(diff)
    auto = _equivalent(removed, added)
    if auto:
        return "equivalent", auto
    function, old, new = function_of(name), " / ".join(removed), " / ".join(added)
    for rule_function, rule_old, rule_new, verdict, why in RULES:
        if rule_function in (function, "*") and rule_old in old and rule_new in new:
            return verdict, why
    kind = survivor_kind(diff)
    return "unclassified", kind


def survivor_table(rows: list[tuple[str, str, str, str]]) -> str:
    """Markdown: one row per survivor (its function, the change, the verdict and why)."""
    out = ["| mutant | change | verdict | why |", "|---|---|---|---|"]
    for name, diff, verdict, why in rows:
        removed, added = _changed(diff)
        change = f"`{' / '.join(removed)[:90]}` → `{' / '.join(added)[:90]}`".replace("|", "\\|")
        out.append(f"| `{function_of(name)}` {name.rpartition('__mutmut_')[2]} | {change} | {verdict} | {why} |")
    return "\n".join(out) + "\n"


def survivor_kind(diff: str) -> str:
    """"log text" or "metric" when every changed line of the mutant lies in a log call or a
    metric update of the original source; "logic" otherwise."""
    source = next((line[4:].strip() for line in diff.splitlines() if line.startswith("--- ")), "")
    path = ROOT / source.removeprefix("a/") if source else None
    removed, _ = _changed(diff)
    if path is None or not path.exists() or not removed:
        return "logic"
    lines = path.read_text().splitlines()
    spans = _spans(path)
    for kind, ranges in spans.items():
        inside = {n for a, b in ranges for n in range(a, b + 1)}
        if all(any(lines[n - 1].strip() == text for n in inside) for text in removed):
            return kind
    return "logic"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
