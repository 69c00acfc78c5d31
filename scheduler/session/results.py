"""Results sequencer: one ``result`` per finalized utterance, in index order, never stuck.

A plain data structure owned by one session actor (no tasks, no I/O, not thread-safe).
Each utterance waits for one answer per target language until its deadline; past the
deadline its missing translations become ``SKIPPED``. :meth:`pop_ready` releases results
strictly in index order, so a result is held back only while an earlier index is still
open, and no longer than that index's deadline.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs

from scheduler.jobs import held_due
from scheduler.protocol import Result, Translation

SUCCESS, FAILED, SKIPPED = "SUCCESS", "FAILED", "SKIPPED"


@attrs.define
class _Open:
    index: int
    reason: str
    turn_id: str
    deadline: float
    tgt_langs: tuple[str, ...]
    translations: dict[str, Translation] = attrs.Factory(dict)
    source_text: str | None = None
    # what a missing answer becomes at the deadline instead of SKIPPED (job never placed)
    fallback: dict[str, Translation] = attrs.Factory(dict)

    @property
    def complete(self) -> bool:
        return len(self.translations) == len(self.tgt_langs)

    def to_result(self) -> Result:
        ordered = {tgt: self.translations[tgt] for tgt in self.tgt_langs}
        status = next((t.status for t in ordered.values() if t.status != SUCCESS), SUCCESS)
        return Result(
            utterance_index=self.index,
            status=status,
            reason=self.reason,
            turn_id=self.turn_id,
            source_text=self.source_text,
            translations=ordered,
        )


class ResultsSequencer:
    """Tracks open utterances from ``next_to_deliver`` on; see the module docstring."""

    def __init__(self, next_index: int = 0) -> None:
        self.next_to_deliver = next_index
        self._next_to_add = next_index
        self._open: dict[int, _Open] = {}

    @property
    def outstanding(self) -> int:
        """Finalized utterances whose result has not been released yet."""
        return len(self._open)

    def add(self, index: int, *, reason: str, turn_id: str, tgt_langs: tuple[str, ...], deadline: float) -> None:
        if index != self._next_to_add:
            raise ValueError(f"utterance {index} added out of order; expected {self._next_to_add}")  # pragma: no mutate
        self._open[index] = _Open(index, reason, turn_id, deadline, tuple(tgt_langs))
        self._next_to_add += 1

    def record(self, index: int, tgt_lang: str, translation: Translation, source_text: str | None = None) -> bool:
        """Store one answer. Returns False (and changes nothing) for an unknown or
        already-released index, an unknown language, or a second answer for a language."""
        utt = self._open.get(index)
        if utt is None or tgt_lang not in utt.tgt_langs or tgt_lang in utt.translations:
            return False
        utt.translations[tgt_lang] = translation
        if utt.source_text is None and translation.status == SUCCESS and source_text is not None:
            utt.source_text = source_text
        return True

    def set_fallback(self, index: int, tgt_lang: str, error: str | None) -> None:
        """While ``error`` is set, a missing answer for ``tgt_lang`` becomes FAILED(error) at the
        deadline instead of SKIPPED (the job is waiting for a node). ``None`` clears it."""
        utt = self._open.get(index)
        if utt is None or tgt_lang not in utt.tgt_langs:
            return
        if error is None:
            utt.fallback.pop(tgt_lang, None)
        else:
            utt.fallback[tgt_lang] = Translation(status=FAILED, error=error)

    def pending_languages(self, index: int) -> list[str]:
        utt = self._open.get(index)
        return [] if utt is None else [t for t in utt.tgt_langs if t not in utt.translations]

    def open_indexes(self) -> list[int]:
        return sorted(self._open)

    def open_count(self) -> int:
        """How many utterances still wait for a translation (``len(open_indexes())``, without sorting)."""
        return len(self._open)

    def expire(self, now: float, *, held_from: float | None = None, hold: float = 0.0) -> int:
        """Resolve every missing translation of utterances past their deadline: FAILED with the
        fallback error if one is set, else SKIPPED. Returns how many became SKIPPED. With
        ``held_from`` (Redis is out since then), a deadline after it is due ``hold`` later."""
        count = 0
        for utt in self._open.values():
            if held_due(utt.deadline, held_from, hold) <= now and not utt.complete:
                for tgt in utt.tgt_langs:
                    if tgt not in utt.translations:
                        fallback = utt.fallback.get(tgt)
                        utt.translations[tgt] = fallback or Translation(status=SKIPPED, error="RESULT_DEADLINE")
                        count += fallback is None
        return count

    def postpone(self, by: Callable[[float], float]) -> None:
        """Move each incomplete utterance's deadline ``d`` later by ``by(d)`` seconds."""
        for utt in self._open.values():
            if not utt.complete:
                utt.deadline += by(utt.deadline)

    def pop_ready(self) -> list[Result]:
        """Release, in index order, every complete utterance from ``next_to_deliver`` on."""
        ready = []
        while (utt := self._open.get(self.next_to_deliver)) is not None and utt.complete:
            ready.append(utt.to_result())
            del self._open[self.next_to_deliver]
            self.next_to_deliver += 1
        return ready

    def next_deadline(self, *, held_from: float | None = None, hold: float = 0.0) -> float:
        """Earliest deadline among incomplete utterances (``inf`` if none); ``held_from`` and
        ``hold`` as in :meth:`expire`."""
        return min((held_due(u.deadline, held_from, hold) for u in self._open.values() if not u.complete), default=math.inf)
