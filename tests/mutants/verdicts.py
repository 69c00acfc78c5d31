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

_NO_DEFAULT = "every caller leaves the default, None"
_OWED = "the key was just read from the dict's own items; nothing removes it before this line"
_NEVER_FAILS = "names the task's failure log only, and this task never raises (its Redis errors are caught inside)"
_KEY_TTL = ("cancel_task then skips the job-key check (this caller's key always names this job) and leaves the "
            "job key's TTL at a day instead of cutting it to the done TTL: no machine step lasts long enough to see it")
_CRASHED_MOVE = ("a crash acting on a move: act_crash meets a redispatch only when its flag is still up at the next "
                 "move, which 80 examples do not always reach")
_AFFINITY = "turn affinity and locality are not modelled: the machine checks that a node is online and free, not which"

RULES: list[tuple[str, str, str, str, str]] = [
    # ---- Placed: a dict that keeps a job id -> job key index
    ("pop", "super().pop(job_key, default)", "super().pop(job_key, None)", EQ, _NO_DEFAULT),
    ("pop", "placement is not None and placement is not default", "or", EQ,
     "with the default None (every caller), both conditions read 'placement is not None'"),
    ("pop", "self.job_keys.pop(placement.job_id, None)", "self.job_keys.pop(placement.job_id, )", EQ,
     "Placed adds the id with every entry and removes it with the entry: it is always there"),
    ("*", "self.placed.pop(", ", )", EQ, "Placed.pop's default is None"),
    # ---- defaults and wiring
    ("__init__", "queue_size: int = 4096", "", MISSED, "a default the daemon passes its setting for; the machine sets 4 or 6"),
    ("__init__", "place_batch: int = 32", "", MISSED, "a default the machine overrides (1, 2 or 32)"),
    ("__init__", "locality_slack: float = 0.0", "", MISSED, _AFFINITY),
    ("__init__", "self._nursery: trio.Nursery | None = None", '""', EQ,
     "only read by the assertion that run() started the dispatcher, which holds for every caller"),
    ("_sweep_orphans", "limit: int = 100", "limit: int = 101", EQ,
     "the page size of one sweep: the next sweep takes the rest (the machine never has 100 orphans)"),
    ("run", 'name="lease_expiry"', "", EQ, _NEVER_FAILS),
    ("run", 'name="release_retry"', "", EQ, _NEVER_FAILS),
    ("run", "every, 2.0, self._sweep_orphans", "every, 3.0", MISSED,
     "the sweep period: the machine allows a lease one sweep plus the grace, measured with a 2 s sweep only"),
    # ---- owed work, iterated from its own dict
    ("_retry_releases", "self._owed_releases.pop(job_id, None)", "self._owed_releases.pop(job_id, )", EQ, _OWED),
    ("_retry_releases", "self._owed_cancels.pop((job_id, attempt), None)", "self._owed_cancels.pop((job_id, attempt), )", EQ,
     _OWED),
    # ---- the job key given to cancel_task
    ("cancel", "placement.job_id, job_key,", "placement.job_id, None,", MISSED, _KEY_TTL),
    ("_retry_releases", "self._release(job_id, job_key,", "self._release(job_id, None,", MISSED, _KEY_TTL),
    ("_release_orphan", "self._release(job_id, job_key,", "self._release(job_id, None,", MISSED, _KEY_TTL),
    ("_abandon_move", "self._release(moving.job_id, job_key,", "self._release(moving.job_id, None,", MISSED, _KEY_TTL),
    ("release", "lua.cancel(job_id, job_key,", "lua.cancel(job_id, None,", MISSED, _KEY_TTL),
    # ---- adopt: guards whose other half decides
    ("adopt", "if job_id and not isinstance(job_id, BaseException) and k not in self.placed and k not in", "BaseException) or k",
     EQ, "a key with no job id (or a failed read) is then looked up as job 'None', which has no hash: skipped below"),
    ("adopt", 'job.get("status") not in ("dispatched", "waiting") or not job.get("audio")', "", EQ,
     "a job hash keeps its audio exactly while dispatched or waiting (complete_task and cancel_task delete it), "
     "so either half of the guard decides alone"),
    ("job_key_of", "self.placed.job_keys.get(job_id)", "get(None)", EQ,
     "a cache: on None the node gateway reads the job key from Redis"),
    # ---- the remote watch
    ("_watch_remote", "for info in infos.values() if info[1]", "if info[2]", EQ,
     "register_node writes a node's owner and conn_id together: both are set or neither"),
    ("_watch_remote", "int(attempt or 0)", "int(attempt or 1)", EQ,
     "attempt is None only with status None, which the branch above takes"),
    ("_watch_remote", 'for o in owners], raise_errors=True)', "", MISSED,
     "Redis failing between the watch's two round trips (an outage starting mid-tick): the error would read as "
     "'instance alive' for one tick"),
    ("_watch_remote", "continue  # answered or moved while we looked", "break", MISSED,
     "needs a remote job answered during the watch's own round trip, with another after it: one tick late"),
    ("redis_data_lost", "keys.job(p.job_id)", "keys.job(None)", MISSED,
     "every job then reads as lost: the machine's data loss loses all of them anyway (a partial loss, e.g. a "
     "lagging replica promoted, is not modelled)"),
    ("redis_data_lost", "if exists == 0 and self.placed.get(p.request.job_key) is p", "or", MISSED,
     "a job Redis still has would move too: the machine's data loss loses all of them (a partial loss is not modelled)"),
    ("_retry_releases", "attempt, counted=counted)", "attempt, )", MISSED,
     "a crashed placement's release that waited out an outage would be counted cancelled as well as failed: the "
     "machine does not count cancelled jobs"),
    ("_refused", "self._metrics.dispatch_errors_total.labels(reply.code).inc()", "labels(None)", MISSED,
     "JOB_ID_TAKEN needs the id sequence restarted below ids in use (Redis data loss and a wall clock stepped "
     "back): not modelled"),
    ("_drop_crashed", "len(reply) >= 4", "len(reply) > 4", EQ, "dispatch_task and redispatch_task reply five fields on success"),
    ("_drop_crashed", "len(reply) >= 4", "len(reply) >= 5", EQ, "dispatch_task and redispatch_task reply five fields on success"),
    ("_place", "self._release(job_id, job_key,", "self._release(job_id, None,", MISSED, _KEY_TTL),
    ("_place", "counted=False)", "counted=None)", EQ, "None is falsy, as False"),
    ("_place", "counted=False)", "attempt, )", MISSED, "a crashed placement would be counted cancelled as well as "
     "failed: the machine does not count cancelled jobs"),
    ("_place", "counted=False)", "counted=True)", MISSED, "a crashed placement would be counted cancelled as well as "
     "failed: the machine does not count cancelled jobs"),
    ("_place", "self._drop_crashed(request, moving,", "self._drop_crashed(request, None,", MISSED, _CRASHED_MOVE),
    ("_drop_crashed", "if moving is not None:", "if moving is None:", MISSED, _CRASHED_MOVE),
    ("_drop_crashed", "self._moving.pop(job_key, None)", "", MISSED, _CRASHED_MOVE),
    ("_drop_crashed", "crashed.append((moving.job_id, job_key, moving.node_id, None))", "", MISSED, _CRASHED_MOVE),
    ("_placed_or_code", 'if reply[0] == "NOOP":', "", MISSED,
     "a NOOP redispatch needs a cancel or an answer landing between the redispatch call and Redis running it "
     "(forget() takes an answered move out of its lane first): not reached at 80 examples"),
    ("cancel", "continue", "break", MISSED,
     "needs one cancel naming a job off the books before a placed one: the cancel rule draws such lists, and the "
     "re-run of the survivors at 16:25 caught it, but not every run of 80 examples does"),
    # ---- leases, sweeps, the orphan path
    ("_expire_leases", "p.lease_deadline <= now", "p.lease_deadline < now", MISSED,
     "a lease ending exactly on a tick moves one tick later, within the bound the machine allows (one tick)"),
    ("_sweep_orphans", "continue", "break", EQ,
     "a job placed here never has a lease lapsed by more than the grace (each instance moves its own within a "
     "tick), so the skip is never taken"),
    ("_release_orphan", '"placed_by")', "", MISSED,
     "a live instance's lease lapsed past the grace (possible only after a Redis outage longer than the grace, "
     "with the sweep running before the owner's expiry tick): the sweep would release it"),
    ("_release_orphan", "keys.instance(placed_by)", "keys.instance(None)", MISSED,
     "only a live instance's job lapsed past the grace (after a long Redis outage) tells 'alive' from 'dead' here"),
    ("_release_orphan", 'if reply is not None and reply[0] == "OK":', "or", MISSED,
     "Redis going away between the sweep's reads and its cancel_task (then the sweep fails once and retries)"),
    # ---- lanes
    ("_lane_step", "self._tell_waiting(lane, request, None)", "self._tell_waiting(None, request, None)", EQ,
     "_tell_waiting reads the lane only for a waiting code; this call passes None"),
    ("_lane_step", "lane.blocked_code = code", "lane.blocked_code = None", MISSED,
     "dispatch_blocked would be logged at every retry of an episode: the records carry no instance id, and two "
     "instances may each log an episode for one pair, so the machine cannot count them per lane"),
    ("answered", "if self._forget(job_key) is not None or freed_here:", "is None", MISSED,
     "a lane waiting for a slot is then woken by its retry timer (0.25 s) instead of at once: latency, not an outcome"),
    ("*", 'logging.INFO, ', "", EQ, "INFO is event()'s default level"),
    # ---- the placement pipeline
    ("_builder", 'if self._keep_audio else ""', "", MISSED, "keep_audio=False (no resume) is not run by the machine"),
    ("_builder", "request.turn_jobs", "", MISSED, _AFFINITY),
    ("_builder", "locality_slack=self._locality_slack", "", MISSED, _AFFINITY),
    ("_builder", "near=self._instance_id", "", MISSED, _AFFINITY),
    ("_builder", "moving.attempt, request.session_id, request.turn_id", "", MISSED, _AFFINITY),
    ("_refused", "if moving is not None and isinstance(reply, UnknownJob):", "or", MISSED,
     "needs a refusal of a kind no script sends to a move (an unexpected error), which would then wait instead of crash"),
    ("_refused", "self._moving.pop(request.job_key, None)", "self._moving.pop(request.job_key, )", MISSED,
     "a cancel of the moving job between the redispatch call and its reply (then KeyError: placement_crashed)"),
    ("_placed_or_code", "self._moving.pop(request.job_key, None)", "self._moving.pop(request.job_key, )", MISSED,
     "a cancel of the moving job between the redispatch call and its reply (then KeyError: placement_crashed)"),
    ("_placed_or_code", "if len(reply) > 4 else", "", EQ,
     "dispatch_task and redispatch_task always reply five fields on success"),
    ("_placed_or_code", "if not self._router.node_is_here(node_id):", "node_is_here(None)", MISSED,
     "a job for a node here goes through the relay path, which hands it over here too; only a node here that "
     "does not read would then move on as NODE_UNREACHABLE without waiting at the lane's head"),
]
