"""The session actor alone: real actor, MockClock (autojump), a recording job port.

The race-proof Hypothesis treatment lives in its own module; these are the named behaviours.
"""

from __future__ import annotations

import pytest
import trio

from scheduler.jobs import JobOutcome, StoreOutage
from scheduler.ops.config import Settings
from scheduler.ops.metrics import Metrics
from scheduler.protocol import Result, SessionClosed, Translation, UtteranceFinalized
from scheduler.session.actor import SessionActor, SlowClient
from scheduler.session.audio import silence, tone
from scheduler.session.events import AudioIn, CloseIn, FinalizeIn

SPEECH = tone(100)  # 100 ms frames
QUIET = silence(100)


class RecordingPort:
    def __init__(self):
        self.requests = []
        self.cancelled = []
        self.out_since = None  # Redis out since then (the test's outage)
        self.last = None  # the last outage that ended

    def outage(self, now):
        return StoreOutage(self.out_since, self.last)

    def submit_nowait(self, request):
        self.requests.append(request)
        return None

    async def cancel(self, session_id, job_keys):
        self.cancelled.extend(job_keys)


class Harness:
    def __init__(self, nursery, outbox_size=1024, **overrides):
        values = dict(pause_ms=800, utterance_timeout_ms=15000, max_utterance_ms=20000, result_deadline_ms=30000,
                      idle_timeout_ms=60000, max_pending_events=128)
        values.update(overrides)
        self.port = RecordingPort()
        self.metrics = Metrics()
        self.actor = SessionActor(session_id="S", src_lang="zh", tgt_langs=("en",), sample_rate=16000,
                                  settings=Settings(**values), jobs=self.port, metrics=self.metrics,
                                  outbox_size=outbox_size)
        self.outcome = None
        self.done = trio.Event()
        nursery.start_soon(self._run)

    async def _run(self):
        try:
            self.outcome = await self.actor.run()
        except SlowClient as exc:
            self.outcome = exc
        self.done.set()

    async def send(self, ev):
        await self.actor.put_client_event(ev)
        await trio.testing.wait_all_tasks_blocked()

    def drain(self):
        out = []
        while True:
            try:
                out.append(self.actor.outbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return out

    def answer(self, index, text="ok", tgt="en"):
        assert self.actor.put_outcome_nowait(
            JobOutcome(index, tgt, Translation(status="SUCCESS", text=text, node_id="n"), f"src{index}"))


def finalized(msgs):
    return [(m.utterance_index, m.reason) for m in msgs if isinstance(m, UtteranceFinalized)]


async def test_is_final_and_finalize_number_utterances(nursery, autojump_clock):
    h = Harness(nursery)
    await h.send(AudioIn.of(SPEECH))
    await h.send(AudioIn.of(SPEECH, is_final=True))
    await h.send(AudioIn.of(SPEECH))
    await h.send(FinalizeIn())
    assert finalized(h.drain()) == [(0, "is_final"), (1, "is_final")]
    assert [r.job_key for r in h.port.requests] == ["S:0:translate:en", "S:1:translate:en"]
    assert h.port.requests[0].audio == SPEECH + SPEECH
    assert h.port.requests[1].audio == SPEECH


async def test_pause_after_no_audio(nursery, autojump_clock):
    h = Harness(nursery)
    await h.send(AudioIn.of(SPEECH))
    start = trio.current_time()
    await trio.sleep(0.79)
    assert finalized(h.drain()) == []
    await trio.sleep(0.02)
    assert finalized(h.drain()) == [(0, "pause")]
    assert trio.current_time() - start >= 0.8


async def test_pause_on_trailing_silence_in_stream(nursery, autojump_clock):
    h = Harness(nursery)
    await h.send(AudioIn.of(SPEECH))
    for _ in range(8):
        await h.send(AudioIn.of(QUIET))
    assert finalized(h.drain()) == [(0, "pause")]
    assert h.port.requests[0].audio == SPEECH + QUIET * 8


async def test_silent_or_empty_utterances_take_no_index(nursery, autojump_clock):
    h = Harness(nursery)
    await h.send(FinalizeIn())
    await h.send(AudioIn.of(QUIET, is_final=True))
    await h.send(AudioIn.of(QUIET))
    await trio.sleep(5)  # pause fires on a silent utterance: discarded
    await h.send(AudioIn.of(SPEECH, is_final=True))
    assert finalized(h.drain()) == [(0, "is_final")]
    assert len(h.port.requests) == 1


async def test_timeout_on_old_utterance(nursery, autojump_clock):
    h = Harness(nursery, utterance_timeout_ms=3000)
    for _ in range(40):  # real-time speech, never a pause
        await h.send(AudioIn.of(SPEECH))
        await trio.sleep(0.1)
    assert finalized(h.drain())[0] == (0, "timeout")


async def test_max_duration_cuts_at_frame_and_keeps_turn(nursery, autojump_clock):
    h = Harness(nursery, max_utterance_ms=1000)
    for _ in range(15):
        await h.send(AudioIn.of(SPEECH))
    await h.send(FinalizeIn())
    msgs = [m for m in h.drain() if isinstance(m, UtteranceFinalized)]
    assert [(m.utterance_index, m.reason, m.audio_ms) for m in msgs] == [(0, "max_duration", 1000), (1, "is_final", 500)]
    assert msgs[0].turn_id == msgs[1].turn_id
    assert [r.turn_action for r in h.port.requests] == ["keep", "end"]
    await h.send(AudioIn.of(SPEECH, is_final=True))
    third = [m for m in h.drain() if isinstance(m, UtteranceFinalized)][0]
    assert third.turn_id != msgs[0].turn_id and h.port.requests[-1].turn_action == "none"


async def test_results_in_order_and_gap_skipped_at_deadline(nursery, autojump_clock):
    h = Harness(nursery, result_deadline_ms=5000)
    for _ in range(3):
        await h.send(AudioIn.of(SPEECH, is_final=True))
    h.answer(2)
    h.answer(1)
    await trio.testing.wait_all_tasks_blocked()
    assert [m for m in h.drain() if isinstance(m, Result)] == []
    await trio.sleep(5.01)
    results = [m for m in h.drain() if isinstance(m, Result)]
    assert [(r.utterance_index, r.status) for r in results] == [(0, "SKIPPED"), (1, "SUCCESS"), (2, "SUCCESS")]
    assert h.metrics.result_gap_timeout_total._value.get() == 1


@pytest.mark.parametrize("outage", [False, True])
async def test_a_redis_outage_is_counted_out_of_the_result_deadlines(nursery, autojump_clock, outage):
    """Deadline 5 s. Utterance 0 at t=0 (due 5), utterance 1 at t=2 (due 7); Redis out from
    t=1 to t=6.5: nothing is SKIPPED meanwhile; then utterance 0 is due at 5 + 5 (the outage
    it overlapped, capped at one deadline) and utterance 1 at 7 + 4.5, so the answers given at
    t=7 and t=10.5 make it. Without the outage both are SKIPPED at 5 and 7."""
    h = Harness(nursery, result_deadline_ms=5000)
    await h.send(AudioIn.of(SPEECH, is_final=True))
    await trio.sleep(1)
    h.port.out_since = 1.0 if outage else None
    await trio.sleep(1)
    await h.send(AudioIn.of(SPEECH, is_final=True))
    await trio.sleep(4.5)  # t = 6.5: past 5, held while Redis is out (at most another 5 s)
    early = [(r.utterance_index, r.status) for r in h.drain() if isinstance(r, Result)]
    assert early == ([] if outage else [(0, "SKIPPED")])
    if outage:
        h.port.out_since, h.port.last = None, (1.0, 6.5)
    h.actor.wake_nowait()  # (the daemon wakes every session when an outage ends)
    await trio.sleep(0.5)  # t = 7: utterance 0 now due at 5 + min(6.5 - 1, 5) = 10
    h.answer(0)
    await trio.sleep(3.5)  # t = 10.5: utterance 1 due at 7 + 4.5 = 11.5
    h.answer(1)
    await trio.sleep(1)
    results = early + [(r.utterance_index, r.status) for r in h.drain() if isinstance(r, Result)]
    assert results == ([(0, "SUCCESS"), (1, "SUCCESS")] if outage else [(0, "SKIPPED"), (1, "SKIPPED")])


async def test_close_finalizes_buffer_and_waits_for_results(nursery, autojump_clock):
    h = Harness(nursery)
    await h.send(AudioIn.of(SPEECH))
    await h.send(CloseIn())
    msgs = h.drain()
    assert finalized(msgs) == [(0, "close")]
    assert not h.done.is_set()
    h.answer(0)
    await h.done.wait()
    msgs = h.drain()
    assert isinstance(msgs[0], Result) and msgs[-1] == SessionClosed(reason="client_close", utterances=1)
    assert h.outcome == "client_close"


async def test_idle_timeout_closes(nursery, autojump_clock):
    h = Harness(nursery, idle_timeout_ms=2000)
    await trio.sleep(2.01)
    await h.done.wait()
    assert h.drain() == [SessionClosed(reason="idle_timeout", utterances=0)]


async def test_a_deadline_of_a_cut_utterance_never_takes_effect(nursery, autojump_clock):
    """Utterance 0 is cut by is_final at 0.5 s, before its pause (1.3 s) and timeout (15 s)
    deadlines; utterance 1 starts at 1.0 s. Nothing may cut utterance 1 at 1.3 s (the old
    pause deadline) or at 15 s (the old timeout): only its own pause, at 1.0 + 0.8 s."""
    h = Harness(nursery)
    await h.send(AudioIn.of(SPEECH))
    await trio.sleep(0.5)
    await h.send(AudioIn.of(SPEECH, is_final=True))
    assert h.actor.timer_deadlines()["pause"] == h.actor.timer_deadlines()["timeout"] == float("inf")
    await trio.sleep(0.5)
    await h.send(AudioIn.of(SPEECH))
    started = trio.current_time()
    await trio.sleep(0.35)  # past the first utterance's pause deadline
    assert finalized(h.drain()) == [(0, "is_final")]
    await trio.sleep(0.5)  # past the second one's
    assert finalized(h.drain()) == [(1, "pause")]
    assert h.actor.timer_deadlines()["pause"] == float("inf")
    assert trio.current_time() - started >= 0.8
    assert h.metrics.duplicate_finalize_suppressed_total._value.get() == 0


async def test_pause_and_timeout_due_at_one_tick_cut_once(nursery, autojump_clock):
    h = Harness(nursery, utterance_timeout_ms=800)
    await h.send(AudioIn.of(SPEECH))  # pause and timeout deadlines both at now + 0.8 s
    await trio.sleep(1)
    assert finalized(h.drain()) == [(0, "pause")]
    assert h.metrics.duplicate_finalize_suppressed_total._value.get() == 1


async def test_slow_client_is_detected(nursery, autojump_clock):
    h = Harness(nursery, outbox_size=2)
    for _ in range(3):
        await h.actor.put_client_event(AudioIn.of(SPEECH, is_final=True))
    await h.done.wait()
    assert isinstance(h.outcome, SlowClient)


async def test_exit_cancels_unanswered_jobs(nursery, autojump_clock):
    h = Harness(nursery)
    await h.send(AudioIn.of(SPEECH, is_final=True))
    await h.send(AudioIn.of(SPEECH, is_final=True))
    h.answer(0)
    await trio.testing.wait_all_tasks_blocked()
    nursery.cancel_scope.cancel()
    await trio.sleep(0)
    assert h.port.cancelled == ["S:1:translate:en"]




class RefusingPort(RecordingPort):
    def submit_nowait(self, request):
        super().submit_nowait(request)
        return "OVERLOADED"


async def test_refused_jobs_fail_at_once_without_stalling(nursery, autojump_clock):
    h = Harness(nursery)
    h.port = h.actor._jobs = RefusingPort()
    await h.send(AudioIn.of(SPEECH, is_final=True))
    (fin, result) = h.drain()
    assert result.status == "FAILED" and result.translations["en"].error == "OVERLOADED"


def burst(h, events):
    """Queue events faster than the actor takes them (no checkpoint in between). A wake token
    first, so that the actor is not parked and does not step the first one inline (actor.py)."""
    h.actor.wake_nowait()
    for ev in events:
        h.actor.backlog.put_nowait(ev)


async def test_backpressure_merges_then_sends_busy_once(nursery, autojump_clock):
    h = Harness(nursery, max_pending_events=4)
    burst(h, [AudioIn.of(SPEECH) for _ in range(11)])
    assert len(h.actor.backlog) == 4  # 3 + one event holding 8 merged frames
    await trio.testing.wait_all_tasks_blocked()
    busy = [m for m in h.drain() if m.TYPE == "busy"]
    assert len(busy) == 1 and busy[0].action == "merged"
    await h.send(FinalizeIn())
    # every frame arrived, in order, in whole frames: 11 frames of 100 ms
    assert finalized(h.drain()) == [(0, "is_final")]
    assert h.port.requests[0].audio == SPEECH * 11


async def test_backpressure_not_enough_finalizes_early_with_reason_backlog(nursery, autojump_clock):
    h = Harness(nursery, max_pending_events=4)
    burst(h, [AudioIn.of(SPEECH) for _ in range(6)] + [FinalizeIn()] * 3)  # merged event, then 3 more queued
    await trio.testing.wait_all_tasks_blocked()
    msgs = h.drain()
    assert [m.action for m in msgs if m.TYPE == "busy"] == ["early_finalize"]
    assert finalized(msgs) == [(0, "backlog")]
    assert h.port.requests[0].audio == SPEECH * 6


async def test_busy_again_only_after_recovering_below_half(nursery, autojump_clock):
    """Two merged events in one episode give one busy; after recovering, a new crossing gives another."""
    h = Harness(nursery, max_pending_events=4)
    for _round in range(2):
        # queue: A A A M(2) F M(5): the second merged event comes while the episode lasts
        burst(h, [AudioIn.of(SPEECH) for _ in range(5)] + [FinalizeIn()] + [AudioIn.of(SPEECH) for _ in range(5)])
        await trio.testing.wait_all_tasks_blocked()
        await h.send(AudioIn.of(SPEECH))  # an unmerged event with an empty backlog: recovered
        await h.send(FinalizeIn())
    assert [m.action for m in h.drain() if m.TYPE == "busy"] == ["early_finalize", "early_finalize"]
    assert h.actor.backlog.merged_frames_total == 2 * (1 + 4)


async def test_pause_fire_overtaken_by_new_audio_is_void(nursery, autojump_clock):
    """The pause deadline passes while a new frame already waits: the frame wins, no pause cut."""
    h = Harness(nursery)
    await h.send(AudioIn.of(SPEECH))
    await trio.sleep(0.5)
    h.actor.backlog.put_nowait(AudioIn.of(SPEECH))  # queued, not yet taken ...
    autojump_clock.jump(0.31)  # ... when the first frame's pause deadline passes
    await trio.testing.wait_all_tasks_blocked()
    assert finalized(h.drain()) == []
    await trio.sleep(0.9)  # the second frame's own pause deadline (0.8 s after it was taken)
    assert finalized(h.drain()) == [(0, "pause")]
    assert h.port.requests[0].audio == SPEECH * 2


async def test_a_session_behind_real_time_is_measured_and_logged_once_per_episode(autojump_clock, caplog):
    """session/lag.py over a real actor whose loop is not running yet (so nothing it was sent
    is processed): its lag is the audio queued and the age of the oldest frame; past 1 s one
    ``session_lagging`` warning, below half a second one ``session_caught_up``."""
    import logging

    from scheduler.session import lag
    from scheduler.session.registry import SessionRegistry

    caplog.set_level(logging.INFO)
    metrics = Metrics()
    actor = SessionActor(session_id="S", src_lang="zh", tgt_langs=("en",), sample_rate=16000, settings=Settings(),
                         jobs=RecordingPort(), metrics=metrics)
    sessions = SessionRegistry(metrics)
    sessions.add(actor)
    for _ in range(3):
        await actor.put_client_event(AudioIn.of(SPEECH))
    assert actor.lag(trio.current_time()) == (300.0, 0.0)
    for _ in range(4):  # 0.5 s per sample: 0, 0.5, 1.0, 1.5 s old
        lag.sample(sessions, metrics, trio.current_time())
        await trio.sleep(0.5)
    while actor.backlog.take() is not None:  # processed
        pass
    lag.sample(sessions, metrics, trio.current_time())
    lag.sample(sessions, metrics, trio.current_time())
    events = [(r.event, r.fields) for r in caplog.records if getattr(r, "event", "").startswith("session_")]
    assert events == [("session_lagging", {"session_id": "S", "lag_ms": 300, "oldest_frame_age_ms": 1500}),
                      ("session_caught_up", {"session_id": "S", "lag_ms": 0})]
    assert metrics.session_lag_seconds._sum.get() == pytest.approx(0 + 0.5 + 1.0 + 1.5)


async def test_a_session_takes_no_input_past_its_unanswered_jobs_until_one_is_answered(nursery, autojump_clock):
    """Fair share (max_jobs_per_session 2): with two translations unanswered the session takes
    no more input (its later utterances wait in its backlog, nothing is dropped); an answer
    lets one more in, a result deadline lets the rest go too; the idle deadline waits."""
    h = Harness(nursery, max_jobs_per_session=2, result_deadline_ms=5000, idle_timeout_ms=3000)
    for _ in range(4):
        await h.send(AudioIn.of(SPEECH, is_final=True))
    assert [r.utterance_index for r in h.port.requests] == [0, 1] and len(h.actor.backlog) == 2
    assert not h.actor.core.takes_input() and h.metrics.session_input_held_total._value.get() == 1
    h.answer(0)
    await trio.testing.wait_all_tasks_blocked()
    assert [r.utterance_index for r in h.port.requests] == [0, 1, 2] and len(h.actor.backlog) == 1
    await trio.sleep(4)  # past idle_timeout_ms: the session waits for its own jobs, its client is not idle
    assert h.actor.closing is None
    await trio.sleep(1.5)  # utterance 1's and 2's deadlines: SKIPPED, and the last one goes in
    assert [r.utterance_index for r in h.port.requests] == [0, 1, 2, 3] and not len(h.actor.backlog)
    statuses = [(m.utterance_index, m.translations["en"].status) for m in h.drain() if isinstance(m, Result)]
    assert statuses == [(0, "SUCCESS"), (1, "SKIPPED"), (2, "SKIPPED")]
