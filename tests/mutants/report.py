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
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CAUGHT = {1, 3, 36, 24, -24, 152, 255}  # killed (a failing check), or timed out (a hang the limit caught)
SURVIVED, NO_TESTS = {0}, {5, 33}


def load() -> dict[str, dict[str, int | None]]:
    out = {}
    for meta in sorted((ROOT / "mutants" / "scheduler").rglob("*.py.meta")):
        module = str(meta.relative_to(ROOT / "mutants")).removesuffix(".meta")
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
        table[module] = {**counts, "mutants": len(codes), "share": round(share, 3)}
        print(f"{module:38} {len(codes):7} {counts['caught']:7} {counts['survived']:8} {counts['no machine']:10} {share:11.1%}"
              + (f"  ({counts['not run']} not run)" if counts["not run"] else ""))
        survivors += [name for name, c in codes.items() if c in SURVIVED]
    (ROOT / "mutants" / "report.json").write_text(json.dumps({"modules": table, "survivors": survivors}, indent=1))
    print(f"\n{len(survivors)} survivors")
    kinds: collections.Counter[str] = collections.Counter()
    for name in survivors:
        if "--no-diff" in argv:
            print(name)
            continue
        diff = show(name)
        kind = survivor_kind(diff)
        kinds[kind] += 1
        print(f"[{kind}] # {name}\n{diff.rstrip()}")
    if kinds:
        print("\nsurvivors by kind: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    return 0


@functools.cache
def _functions(module: str) -> dict[str, str]:
    """Every function of mutmut's copy of ``module`` (``mutants/<path>``), by name, as source."""
    path = ROOT / "mutants" / (module.replace(".", "/") + ".py")
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


REDIS_COMMANDS = {"GET", "SET", "DEL", "EXISTS", "INCRBY", "HGET", "HSET", "HMGET", "HGETALL", "HKEYS", "HDEL", "SMEMBERS",
                  "SADD", "SREM", "SCARD", "ZADD", "ZREM", "ZRANGE", "ZRANGEBYSCORE", "ZSCORE", "EXPIRE", "PING"}
STRICT = re.compile(r",\s*strict=(True|False|None)\)|,\s*\)")


def _equivalent(removed: list[str], added: list[str]) -> str | None:
    """The two kinds of survivor no caller can tell from the original, by their diff:
    a Redis command name in another case (Redis reads command names case-insensitively),
    and ``zip(..., strict=True)`` made lax where the sequences are equal in length by
    construction."""
    if len(removed) != 1 or len(added) != 1:
        return None
    old, new = removed[0], added[0]
    if old != new and old.lower() == new.lower() and any(c.isupper() for c in old):
        changed = {w for w in re.findall(r'"([A-Z]+)"', old)} - {w for w in re.findall(r'"([A-Z]+)"', new)}
        if changed and changed <= REDIS_COMMANDS:
            return "equivalent: Redis command case"
    if "zip(" in old and "strict=True" in old and STRICT.sub(")", old) == STRICT.sub(")", new):
        return "equivalent: zip strictness"
    return None


def survivor_kind(diff: str) -> str:
    """"log text" or "metric" when every changed line of the mutant lies in a log call or a
    metric update of the original source; one of the two equivalent kinds of
    :func:`_equivalent`; "logic" otherwise."""
    source = next((line[4:].strip() for line in diff.splitlines() if line.startswith("--- ")), "")
    path = ROOT / source.removeprefix("a/") if source else None
    removed = [line[1:].strip() for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    equivalent = _equivalent(removed, added)
    if equivalent:
        return equivalent
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
