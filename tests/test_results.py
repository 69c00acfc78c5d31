import math

from scheduler.protocol import Translation
from scheduler.session.results import ResultsSequencer

OK = Translation(status="SUCCESS", text="hi", node_id="n1")


def add(seq, index, deadline=10.0, tgts=("en",)):
    seq.add(index, reason="pause", turn_id="t", tgt_langs=tgts, deadline=deadline)


def test_results_leave_in_index_order():
    seq = ResultsSequencer()
    for i in range(3):
        add(seq, i)
    assert seq.record(2, "en", OK) and seq.record(1, "en", OK)
    assert seq.pop_ready() == []  # 0 still open
    assert seq.record(0, "en", OK, "src")
    assert [r.utterance_index for r in seq.pop_ready()] == [0, 1, 2]
    assert seq.outstanding == 0


def test_deadline_turns_missing_into_skipped_and_unblocks_later():
    seq = ResultsSequencer()
    add(seq, 0, deadline=5.0)
    add(seq, 1, deadline=6.0)
    seq.record(1, "en", OK)
    assert seq.next_deadline() == 5.0
    assert seq.expire(4.9) == 0 and seq.pop_ready() == []
    assert seq.expire(5.0) == 1
    results = seq.pop_ready()
    assert [(r.utterance_index, r.status) for r in results] == [(0, "SKIPPED"), (1, "SUCCESS")]
    assert math.isinf(seq.next_deadline())


def test_second_answer_and_late_answer_are_refused():
    seq = ResultsSequencer()
    add(seq, 0, tgts=("en", "de"))
    assert seq.record(0, "en", OK)
    assert not seq.record(0, "en", OK)
    assert not seq.record(0, "fr", OK)
    assert seq.record(0, "de", Translation(status="FAILED", error="X"))
    (result,) = seq.pop_ready()
    assert result.status == "FAILED" and list(result.translations) == ["en", "de"]
    assert not seq.record(0, "de", OK)  # already released


def test_status_is_first_non_success_in_target_order():
    seq = ResultsSequencer()
    add(seq, 0, tgts=("en", "de", "fr"))
    seq.record(0, "fr", Translation(status="FAILED"))
    seq.record(0, "en", OK)
    seq.expire(100)
    (result,) = seq.pop_ready()
    assert result.status == "SKIPPED"  # de (SKIPPED) comes before fr (FAILED)


def test_waiting_job_fails_instead_of_skipping_and_placement_clears_it():
    seq = ResultsSequencer()
    add(seq, 0, deadline=5.0, tgts=("en", "de"))
    seq.set_fallback(0, "en", "NO_AVAILABLE_NODE")
    seq.set_fallback(0, "de", "NO_AVAILABLE_NODE")
    seq.set_fallback(0, "de", None)  # de got placed after all, then never answered
    assert seq.expire(5.0) == 1
    (result,) = seq.pop_ready()
    assert result.translations["en"] == Translation(status="FAILED", error="NO_AVAILABLE_NODE")
    assert result.translations["de"].status == "SKIPPED"
