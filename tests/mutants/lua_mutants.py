"""Lua mutants: realistic one-line bugs in the scheduling scripts, each run against the Lua
state machine alone (``tests/test_lua_stateful.py``, or layout 2's two-step machine
``tests/test_layout2_stateful.py``; real Valkey, single and cluster).

``just mutants`` runs this after mutmut. Each mutant is a literal text replacement in one
script; the script must contain the text exactly once (a mutant that no longer applies is
an error, so the list stays true as the scripts change). Prints one line per mutant and a
summary, writes ``mutants/lua.json``, and exits 1 if any mutant survives.

    uv run python -m tests.mutants.lua_mutants [NAME ...]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parents[2]


@attrs.frozen
class Mutant:
    name: str
    script: str  # path under luascripts/
    find: str
    replace: str
    bug: str
    test: str = "tests/test_lua_stateful.py"  # the machine that must catch it


MUTANTS = [
    Mutant("refused_dispatch_claims_key", "dispatch_task.lua", "  redis.call('DEL', jobkey_key)  -- refused: the claim is let go\n",
           "", "a refused dispatch leaves its job key claimed: the retry sees EXISTS for a job that does not exist"),
    Mutant("no_exists_check", "dispatch_task.lua", "redis.call('SET', jobkey_key, job_id, 'NX', 'EX', key_ttl_s)",
           "redis.call('SET', jobkey_key, job_id, 'EX', key_ttl_s)",
           "the job key is claimed whether or not it was free: a second dispatch of one key makes a second job"),
    Mutant("release_without_membership", "lib/slots.lua",
           "if redis.call('SREM', jobs_key, job_id) == 1 and", "if redis.call('SREM', jobs_key, job_id) >= 0 and",
           "a slot is released whether or not the node still held the job (a waiting job's cancel frees it twice)",
           "tests/test_layout2_stateful.py"),  # (its machine cancels waiting jobs, and jobs that left their node)
    Mutant("cancel_after_complete", "cancel_task.lua", "if j[3] ~= 'dispatched' and j[3] ~= 'waiting' then",
           "if not j[3] then", "a cancel after the answer marks the finished job cancelled"),
    Mutant("redispatch_keeps_old_lease", "lib/move.lua",
           "take_slot(declared.runtime, chosen, nodes[chosen].jobs, job_id, j.leases_key, j.now_ms + j.lease_ms)",
           "take_slot(declared.runtime, chosen, nodes[chosen].jobs, job_id, j.leases_key, "
           "tonumber(redis.call('HGET', job_hash_key, 'lease_deadline_ts') or j.now_ms))",
           "a redispatched job keeps its old lease: it expires again at once"),
    Mutant("redispatch_same_attempt", "lib/move.lua", "'node_id', chosen, 'attempt', attempt + 1,",
           "'node_id', chosen, 'attempt', attempt,", "a move does not fence the old attempt's answer"),
    Mutant("complete_any_attempt", "complete_task.lua", "if tonumber(j[2]) ~= attempt then", "if false then",
           "an answer of an old attempt is accepted"),
    Mutant("complete_any_node", "complete_task.lua", "if j[1] ~= node_id then", "if false then",
           "an answer from a node that does not hold the job is accepted"),
    Mutant("complete_twice", "complete_task.lua", "if j[3] ~= 'dispatched' then", "if j[3] == 'cancelled' then",
           "a second answer for a finished job is accepted"),
    Mutant("complete_keeps_slot", "complete_task.lua", "release_slot(runtime_key, node_id, jobs_key, leases_key, job_id)\nreturn",
           "return", "an answered job keeps its slot"),
    Mutant("over_capacity", "lib/choose_node.lua", "if n.current >= n.max_jobs then return nil end",
           "if n.current > n.max_jobs then return nil end", "a node gets one job more than max_jobs"),
    Mutant("offline_node_chosen", "lib/choose_node.lua", "n.online ~= '1' or ", "",
           "the online flag is not read: a dead node is chosen"),
    Mutant("dead_owner_chosen", "lib/choose_node.lua", "known = (lapses and tonumber(lapses) < now_ms) and true or false",
           "known = false", "an instance's lapsed liveness is not read: a node of a dead instance is chosen"),
    Mutant("liveness_memo_forgets", "lib/choose_node.lua", "lapsed_owner[owner] = known", "lapsed_owner[owner] = false",
           "an instance's lapsed liveness counts for its first node only: its second node is chosen"),
    Mutant("lease_not_removed", "lib/slots.lua", "  redis.call('ZREM', leases_key, job_id)\n", "",
           "a job that left its node keeps its lease entry"),
    Mutant("cancel_keeps_slot", "cancel_task.lua",
           "release_slot(runtime_key, node_id, jobs_key, leases_key, job_id)  -- a waiting job", "-- a waiting job",
           "a cancelled job keeps its slot"),
    Mutant("burn_writes_nothing", "job_burn.lua",
           "redis.call('HSET', job, 'job_id', ARGV[2], 'job_key', ARGV[1], 'status', 'burned', 'finished_ts', ARGV[3])", "",
           "a burned id is not recorded: a stale owner's late step 2 places a job the new owner replaced",
           "tests/test_layout2_stateful.py"),
    Mutant("claim_not_fenced", "session_claim.lua", "local fenced = claim_fenced(session, session_id, epoch)",
           "local fenced = nil", "a stale owner's claim moves on after the session was resumed elsewhere",
           "tests/test_layout2_stateful.py"),
    Mutant("claim_overwrites", "session_claim.lua",
           "if existing and existing ~= job_id and (replaces == '' or existing ~= replaces) then", "if false then",
           "a claim replaces another job's claim: two jobs for one job key", "tests/test_layout2_stateful.py"),
    Mutant("move_in_over_burned", "job_move_in.lua", "if made[1] then", "if false then",
           "a job moving across shards is made over the id a release burned: it runs after its release",
           "tests/test_layout2_stateful.py"),
    Mutant("moved_names_nothing", "cancel_task.lua",
           "return {'NOOP', 'moved', redis.call('HGET', job_key_hash, 'moved_to') or ''}", "return {'NOOP', 'moved', ''}",
           "a release of a job that moved across shards does not follow it: the job it became runs on",
           "tests/test_layout2_stateful.py"),
    Mutant("heartbeat_copy_forgotten", "heartbeats.lua",
           "  redis.call('HSET', runtime_key, node_id, runtime_copy(info), RUNTIME_TABLE_MARK[1], RUNTIME_TABLE_MARK[2])\n", "",
           "a heartbeat updates the node's info, not the copy node choice reads: a node seen silent, or saturated, "
           "after its heartbeat said otherwise"),
    Mutant("heartbeats_one_node_s_values", "heartbeats.lua", "local a = 2 + 6 * (i - 1)", "local a = 2",
           "a batch writes its first node's load, score and connection for every node in it"),
    Mutant("node_state_copy_forgotten", "node_state.lua", "  redis.call('HSET', runtime_key, node_id, runtime_copy(info))\n", "",
           "a node that went offline or draining is still online and not draining for node choice"),
    Mutant("pools_version_kept_on_join", "register_node.lua",
           "pools_changed = redis.call('SADD', KEYS[4 + i], node_id) == 1 or pools_changed",
           "redis.call('SADD', KEYS[4 + i], node_id)",
           "a node joining a pool leaves the pool tables' version as it was: callers keep placing on the nodes "
           "they knew of, never on the new one"),
    Mutant("stale_candidates_trusted", "lib/choose_node.lua", "if current ~= declared.version then", "if false then",
           "node choice trusts the caller's candidates whatever the version: a node registered since is never chosen"),
    Mutant("claim_journals_counted", "lib/session_claim.lua",
           "if entry and entry ~= '' and tonumber(session[4] or '0') <= index then", "if entry and entry ~= '' then",
           "a job created late writes the journal entry of an utterance the journal counted already (its result may "
           "be sent and trimmed: a resume would owe it again)"),
    Mutant("claim_journal_uncounted", "lib/session_claim.lua",
           "    fields[#fields + 1] = 'finalized'\n    fields[#fields + 1] = index + 1\n", "",
           "a job's creation writes its utterance's entry without counting it: a resume numbers it again"),
    Mutant("session_ttl_never_set", "lib/session_claim.lua",
           "  if renew then\n    redis.call('EXPIRE', session_key, key_ttl_s)\n  end\n", "",
           "a claim that makes the session hash gives it no TTL: it is never collected"),
    Mutant("affinity_unread_at_turn_end", "lib/session_claim.lua",
           "if turn_action == 'keep' or turn_action == 'end' then", "if turn_action == 'keep' then",
           "the last utterance of a kept turn (\"end\") does not follow the turn's node: its affinity is read only for "
           "\"keep\" jobs"),
    Mutant("claim_move_overwrites", "claim_move.lua", "if current and current ~= ARGV[1] then", "if false then",
           "a move across shards takes a claim another job holds now: two jobs answer one job key",
           "tests/test_layout2_stateful.py"),
]


def apply(mutant: Mutant, target: Path) -> None:
    path = target / mutant.script
    text = path.read_text()
    if text.count(mutant.find) != 1:
        raise SystemExit(f"mutant {mutant.name}: {mutant.find!r} occurs {text.count(mutant.find)} times in {mutant.script}")
    path.write_text(text.replace(mutant.find, mutant.replace))


def run(mutant: Mutant) -> tuple[bool, float, str]:
    """(caught, seconds, the failure's first assertion line)."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "luascripts"
        shutil.copytree(ROOT / "luascripts", target)
        apply(mutant, target)
        env = {**os.environ, "LUA_MUTANT_DIR": str(target), "HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "mutants")}
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pytest", mutant.test, "-x", "-q", "-p", "no:cacheprovider",
                               "-p", "tests.mutants.lua_dir"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        elapsed = time.monotonic() - t0
    why = next((line.strip() for line in proc.stdout.splitlines() if line.lstrip().startswith("E ")), "")
    return proc.returncode != 0, elapsed, why[:160]


def main(names: list[str]) -> int:
    chosen = [m for m in MUTANTS if not names or m.name in names]
    report = []
    for mutant in chosen:
        caught, seconds, why = run(mutant)
        report.append({"name": mutant.name, "script": mutant.script, "bug": mutant.bug, "caught": caught,
                       "seconds": round(seconds, 1), "failure": why})
        print(f"{'caught  ' if caught else 'SURVIVED'} {mutant.name:30} {seconds:5.1f}s  {why if caught else mutant.bug}", flush=True)
    caught = sum(r["caught"] for r in report)
    print(f"Lua mutants caught by the Lua machine: {caught}/{len(report)}")
    out = ROOT / "mutants"
    out.mkdir(exist_ok=True)
    (out / "lua.json").write_text(json.dumps(report, indent=1))
    return 0 if caught == len(report) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
