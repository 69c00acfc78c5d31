"""A sweep of `just bench` runs: overhead p99 and daemon CPU against the number of sessions.

One `bench/load.py` run per session count (``--sessions-list``), one after the other, each with a
fresh daemon and Valkey and the same flags (pass the daemon's with ``--daemon-arg``, e.g.
``--daemon-arg=--workers=2``). The load generator is bench/loadgen.py in its own process, as in
every `just bench`. Reports, per count: sessions held, overhead p50/p99, finalize -> dispatch
p99, the daemon's CPU (all its processes: with ``--workers`` the workers' too), the
generator's CPU and whether the run was valid (the generator kept its schedule); the largest
count whose p99 stayed under ``--target-ms``. Writes JSON and a PNG (p99 and CPU against
sessions) to --out (default bench/results/sweep.json / .png).

Usage: python bench/sweep.py --sessions-list 100,200,400,600,800,1000 --duration 30 --daemon-arg=--workers=2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = load.parser()
    p.description = __doc__
    p.add_argument("--sessions-list", default="100,200,400,600,800,1000",
                   help="session counts, comma-separated (default 100,200,400,600,800,1000)")
    p.add_argument("--target-ms", type=float, default=50.0, help="the overhead p99 target (default 50 ms)")
    p.set_defaults(out="bench/results/sweep.json", skip_baselines=True)
    return p


async def sweep(args: argparse.Namespace) -> dict[str, Any]:
    points = []
    for n in [int(x) for x in args.sessions_list.split(",") if x.strip()]:
        one = argparse.Namespace(**{**vars(args), "sessions": n,
                                    "out": str(Path(args.out).with_suffix(f".{n}.json"))})
        print(f"sweep: {n} sessions ...", file=sys.stderr)
        data = await load.run(one)
        active = data["active"]
        points.append({
            "sessions": n, "held": active["sessions"], "valid": data["valid"],
            "overhead_ms": active["daemon_overhead_ms"], "finalize_to_dispatch_p99_ms": active["finalize_to_dispatch_ms"]["p99"],
            "daemon_cpu_pct_of_core": active["daemon_cpu_pct_of_core"], "valkey_cpu_pct_of_core": active["valkey_cpu_pct_of_core"],
            "generator_cpu_pct_of_core": active["generator"]["cpu_pct_of_core"],
            "harness_cpu_pct_of_core": active["harness_cpu_pct_of_core"], "results_per_s": active["results_per_s"],
            "errors": active["errors"],
        })
        print(json.dumps(points[-1]), file=sys.stderr)
    within = [p["sessions"] for p in points if p["valid"] and p["overhead_ms"]["p99"] is not None
              and p["overhead_ms"]["p99"] < args.target_ms and p["held"] == p["sessions"]]
    return {"args": vars(args), "points": points, "target_ms": args.target_ms,
            "largest_within_target": max(within, default=None)}


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = data["points"]
    xs = [p["sessions"] for p in points]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(xs, [p["overhead_ms"]["p99"] for p in points], "o-", color="tab:blue", label="overhead p99 (ms)")
    ax.plot(xs, [p["overhead_ms"]["p50"] for p in points], "o--", color="tab:blue", alpha=0.5, label="overhead p50 (ms)")
    ax.axhline(data["target_ms"], color="grey", linestyle=":", label=f"{data['target_ms']:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("real-time sessions")
    ax.set_ylabel("ms")
    ax2 = ax.twinx()
    ax2.plot(xs, [p["daemon_cpu_pct_of_core"] for p in points], "s-", color="tab:red", label="daemon CPU (% of a core)")
    ax2.plot(xs, [p["generator_cpu_pct_of_core"] for p in points], "^-", color="tab:green", label="generator CPU")
    ax2.set_ylabel("% of one core")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    flags = " ".join(data["args"]["daemon_arg"]) or "one process"
    ax.set_title(f"overhead and CPU against sessions ({flags})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    args = parser().parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    data = trio.run(sweep, args)
    plot(data, Path(args.out).with_suffix(".png"))
    Path(args.out).write_text(json.dumps(data, indent=2))
    print(json.dumps({k: v for k, v in data.items() if k != "args"}, indent=2))


if __name__ == "__main__":
    main()
