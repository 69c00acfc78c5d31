# Recipes for the speech job scheduler. Needs only `uv` and `just` (pip install rust-just uv).
set shell := ["bash", "-euo", "pipefail", "-c"]

export UV_PYTHON_DOWNLOADS := "never"
export STRESS_EXAMPLES_DECODE := env_var_or_default("STRESS_EXAMPLES_DECODE", "20000")

# list the recipes
default:
    @just --list

# install the locked dependencies into .venv
sync:
    uv sync --frozen

# run the daemon with embedded defaults (extra flags pass through: just run --ws-port 9000)
run *ARGS: sync
    uv run --frozen scheduler serve {{ARGS}}

# run a reference worker node (just node --lang-pair zh:en --max-jobs 4)
node *ARGS: sync
    uv run --frozen scheduler node {{ARGS}}

# stream a WAV file (just client --wav speech.wav --src zh --tgt en)
client *ARGS: sync
    uv run --frozen scheduler client {{ARGS}}

# idle workers take queued tests from busy ones; extra pytest flags pass through (-n 0: one process)
# run the whole test suite on four pytest-xdist workers
test *ARGS: sync
    uv run --frozen pytest -n 4 --dist worksteal {{ARGS}}

# refresh uv.lock after editing pyproject.toml
lock:
    uv lock

# EVALSHA throughput: raw redis-py vs the Trio batching adapter (prints JSON)
bench-adapter *ARGS: sync
    uv run --frozen python bench/adapter_throughput.py {{ARGS}}

# (just bench --sessions 200 --duration 20; --profile adds py-spy stacks of the daemon)
# load harness: N real-time clients + M simulated nodes against a daemon process; JSON + PNG in bench/results/
bench *ARGS: sync
    uv run --frozen --group bench python bench/load.py {{ARGS}}

# JSON + PNG in bench/results/sweep.*
# (just bench-sweep --sessions-list 100,200,400,600,800,1000 --daemon-arg=--workers=2; docs/performance.md)
# one `just bench` per session count, one after the other: overhead p99 and CPU against sessions
bench-sweep *ARGS: sync
    uv run --frozen --group bench python bench/sweep.py {{ARGS}}

# two bare servers on one generator schedule, frames per CPU-second in interleaved rounds, JSON in bench/results/codec.json
# frame codec A/B: the daemon's codec and a bare parser against trio-websocket's (bench/codec.py)
bench-codec *ARGS: sync
    uv run --frozen python bench/codec.py {{ARGS}}

# (clients arriving over 20 s), with --max-sessions and without any limit, in one period; JSON in
# bench/results/overload.json (just bench-overload --offered 300 --max-sessions 150 --rounds 2;
# docs/performance.md, "Overload, A/B")
# overload A/B: one daemon process offered about twice what it carries, with and without admission limits
bench-overload *ARGS: sync
    uv run --frozen --group bench python bench/overload.py {{ARGS}}

# (alone / flooded / flooded with the session bounds off; JSON in bench/results/fairness.json;
# docs/performance.md, "Fair share")
# fair share: a real-time witness beside three flooding sessions
bench-fairness *ARGS: sync
    uv run --frozen --group bench python bench/fairness.py {{ARGS}}

# two searches of 5,000 with fresh seeds, one per core (docs/performance.md has the time); each prints
# its seed, to replay: --hypothesis-seed=N; then the decode path's fuzz properties with 20,000
# examples each (STRESS_EXAMPLES_DECODE)
# the session core's Hypothesis state machine with 10,000 examples, then the decode fuzz properties
stress *ARGS: sync
    #!/usr/bin/env bash
    set -euo pipefail
    logs=$(mktemp -d)
    run() { HYPOTHESIS_PROFILE=stress STRESS_EXAMPLES=5000 uv run --frozen pytest tests/test_core_stateful.py -k TestCoreMachine -q -p no:cacheprovider --timeout 0 --hypothesis-seed="$1" --hypothesis-show-statistics {{ARGS}} > "$logs/$1.log" 2>&1; }
    seeds=("$RANDOM$RANDOM" "$RANDOM$RANDOM")
    run "${seeds[0]}" & first=$!
    run "${seeds[1]}" & second=$!
    status=0
    wait "$first" || status=1
    wait "$second" || status=1
    for seed in "${seeds[@]}"; do echo "== seed $seed"; cat "$logs/$seed.log"; done
    echo "== the decode path's properties (tests/test_decode.py), $STRESS_EXAMPLES_DECODE examples each"
    HYPOTHESIS_PROFILE=stress STRESS_EXAMPLES=$STRESS_EXAMPLES_DECODE uv run --frozen pytest tests/test_decode.py -q -p no:cacheprovider --timeout 0 || status=1
    exit "$status"

# (docs/testing.md): mutmut on the session core, backlog, results and dispatcher with the state
# machines alone as the test command, then the Lua mutants against the Lua machine; prints the caught
# share per module and every survivor (mutants/ keeps mutmut's cache: delete it for a fresh run)
# mutation testing: mutmut on the core modules, then the Lua mutants
mutants *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    uv sync --frozen --group mutants
    HYPOTHESIS_PROFILE=mutants DISPATCHER_EXAMPLES=80 uv run --frozen --group mutants mutmut run --max-children "$(nproc)" {{ARGS}} > /dev/null || true
    uv run --frozen --group mutants python -m tests.mutants.report
    HYPOTHESIS_PROFILE=mutants uv run --frozen python -m tests.mutants.lua_mutants
    uv sync --frozen

# (docs/security.md): a real daemon, two nodes, three witness sessions, hostile frames, handshakes and raw bytes on
# all three listeners; checks it never exits, answers every case as documented and serves the witnesses in order
# (just fuzz --seconds 600 --seed 7; a failure prints NAME:SEED, to replay: just fuzz --replay NAME:SEED; --help lists the knobs)
# black-box fuzzing of a real daemon's three listeners
fuzz *ARGS: sync
    uv run --frozen python -m tests.fuzz.blackbox {{ARGS}}

# (at the rate of 2,000 real-time sessions; Valkey CPU per result and each shard's share; docs/scaling.md)
# scheduling shards by simulation: the real scripts on K = 1, 2, 4 valkey-servers
bench-shards *ARGS: sync
    uv run --frozen python bench/shards.py {{ARGS}}

# scheduling core: load balance over 8 nodes, dispatch+complete pairs/s adapter vs raw (prints JSON)
bench-scheduling *ARGS: sync
    uv run --frozen python bench/scheduling.py {{ARGS}}

# what --redis-wait-replicas costs: dispatch+complete pairs against a Sentinel group, WAIT off / 1 / 2 (docs/redis.md)
bench-replicas *ARGS: sync
    uv run --frozen python bench/replicas.py {{ARGS}}

# 1, 2 and 4 daemon instances on one Valkey: throughput and result latency, ratio to one (docs/scaling.md)
bench-instances *ARGS: sync
    uv run --frozen python bench/instances.py {{ARGS}}

# (just chaos --duration 120; add Redis faults with --faults node,kill,term,redis,stall,full; --workers 3 strikes the
# workers of one supervisor instead, and there --faults ...,reload sends it SIGHUP too; --help lists the knobs)
# chaos: 3 instances on one Valkey, nodes, resuming clients; kill -9 / SIGTERM / node cuts every ~5 s (docs/scaling.md)
chaos *ARGS: sync
    uv run --frozen python bench/chaos.py {{ARGS}}

# kill -9 one of two instances mid-stream; clients resume on the other; prints the failover time
failover: sync
    uv run --frozen python -m pytest -s -q tests/test_failover.py

# (with Debian's apertium + apertium-eng-spa the Spanish is real; without them a tagged placeholder)
# the whole path in one command: daemon + a pocketsphinx/Apertium node + the client streaming a bundled English recording
demo: sync
    #!/usr/bin/env bash
    set -euo pipefail
    free_port() { uv run --frozen python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
    ws=$(free_port); admin=$(free_port)
    mt=echo
    if command -v apertium >/dev/null && apertium -l 2>/dev/null | grep -x ' *eng-spa' >/dev/null; then mt=apertium
    else echo "no Apertium English-Spanish here: the translation is a placeholder (apt-get install apertium apertium-eng-spa)"; fi
    uv run --frozen scheduler serve --ws-port "$ws" --admin-port "$admin" --pause-ms 600 --log-level warning & daemon=$!
    node=""
    trap 'kill $node $daemon 2>/dev/null || true; wait 2>/dev/null || true' EXIT
    until uv run --frozen python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$admin/readyz')" 2>/dev/null; do sleep 0.2; done
    uv run --frozen scheduler node --url "ws://127.0.0.1:$ws" --node-id demo-asr --lang-pair en:es --asr pocketsphinx --mt "$mt" --delay-ms 0 --log-level warning & node=$!
    until uv run --frozen python -c "import json, urllib.request; assert json.load(urllib.request.urlopen('http://127.0.0.1:$admin/status'))['nodes']" 2>/dev/null; do sleep 0.2; done
    echo "streaming tests/data/speech-en.wav in real time, English -> Spanish by $mt (web app: http://127.0.0.1:$admin/app?src=en&tgt=es, status page: http://127.0.0.1:$admin/)"
    uv run --frozen scheduler client --url "ws://127.0.0.1:$ws" --wav tests/data/speech-en.wav --src en --tgt es
