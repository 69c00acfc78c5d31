"""A lane's queue (placement/fairqueue.py): moves first, then sessions in turn, each session's
own jobs in order; a session whose first job leaves goes to the back of the turn order."""

from __future__ import annotations

from scheduler.jobs import JobRequest
from scheduler.placement.fairqueue import FairQueue


def job(session: str, index: int) -> JobRequest:
    return JobRequest(job_key=f"{session}:{index}:translate:en", session_id=session, utterance_index=index, src_lang="zh",
                      tgt_lang="en", turn_id=f"{session}:t", turn_action="none", turn_jobs=1, sample_rate=16000, audio=b"",
                      deadline=0.0)


def names(q: FairQueue) -> list[str]:
    return [f"{r.session_id}{r.utterance_index}" for r in q]


def test_sessions_take_turns_and_a_burst_waits_behind_itself():
    q = FairQueue()
    for i in range(4):
        q.append(job("a", i))  # a's burst
    q.append(job("b", 0))
    q.append(job("c", 0))
    q.append(job("b", 1))
    assert names(q) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"] and len(q) == 7
    moved = job("z", 9)
    q.appendleft(moved)  # a move goes ahead of every fresh job
    assert names(q)[0] == "z9" and q.head() is moved
    assert q.remove(moved) and not q.remove(moved)


def test_a_served_session_goes_to_the_back():
    q = FairQueue()
    a0, a1, b0 = job("a", 0), job("a", 1), job("b", 0)
    for r in (a0, a1, b0):
        q.append(r)
    assert q.remove(a0)  # a was served: b's turn comes first now
    assert names(q) == ["b0", "a1"]
    assert q.remove(job("b", 0)) is False  # (by identity only)
    assert q.remove(a1)  # a has no job left: it leaves the turn order
    assert names(q) == ["b0"]
    assert q.remove(b0) and not q and len(q) == 0 and q.head() is None
