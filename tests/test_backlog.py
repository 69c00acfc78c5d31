import trio

from scheduler.session.backlog import ClientBacklog
from scheduler.session.events import AudioIn, CloseIn, FinalizeIn


def frame(n: int) -> bytes:
    return bytes([n % 256]) * 4


def make(budget=3, max_bytes=10_000, clock=lambda: 0.0):
    wakes = []
    return ClientBacklog(budget, max_bytes, lambda: wakes.append(1), clock), wakes


def test_lag_is_the_queued_audio_and_the_age_of_its_oldest_frame():
    now = [10.0]
    b, _ = make(budget=2, clock=lambda: now[0])
    assert b.lag(now[0]) == (0, 0.0)
    b.put_nowait(FinalizeIn())  # not audio: no lag
    assert b.lag(12.0) == (0, 0.0)
    b.put_nowait(AudioIn.of(frame(0)))
    now[0] = 10.5
    b.put_nowait(AudioIn.of(frame(1)))  # merged into the first audio event: still its age
    assert b.lag(11.0) == (8, 1.0)
    b.take()  # the finalize
    assert b.lag(11.0) == (8, 1.0)
    b.take()
    assert b.lag(11.0) == (0, 0.0)


async def test_a_put_waiting_for_room_counts_its_frame_as_unprocessed(autojump_clock):
    b, _ = make(budget=1, max_bytes=4, clock=trio.current_time)
    b.put_nowait(AudioIn.of(frame(0)))
    b.take()  # processed: the backlog is empty, yet a full one follows
    b.put_nowait(AudioIn.of(frame(1)))  # 4 bytes: at the memory bound
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.put, AudioIn.of(frame(2)))
        await trio.sleep(2)
        assert b.lag(trio.current_time()) == (4, 2.0)  # the queued frame's age (both arrived at `start`)
        b.take()
    assert b.lag(start + 3) == (4, 3.0)


def test_queues_as_is_up_to_budget_then_merges_audio_in_order():
    b, wakes = make(budget=3)
    for i in range(6):
        b.put_nowait(AudioIn.of(frame(i)))
    assert len(b) == 3 and wakes == [1]
    events = [b.take() for _ in range(3)]
    assert [e.frames for e in events[:2]] == [(frame(0),), (frame(1),)]
    assert events[2].frames == (frame(2), frame(3), frame(4), frame(5)) and events[2].merged == 3
    assert b.take() is None and b.nbytes == 0


def test_finalize_and_close_are_never_merged_or_dropped():
    b, _ = make(budget=2)
    b.put_nowait(AudioIn.of(frame(0)))
    b.put_nowait(FinalizeIn())
    b.put_nowait(AudioIn.of(frame(1)))  # over budget, tail is not audio: new event
    b.put_nowait(AudioIn.of(frame(2), is_final=True))  # merges, carries is_final
    b.put_nowait(AudioIn.of(frame(3)))  # tail is final: new event
    b.put_nowait(CloseIn())
    got = []
    while (ev := b.take()) is not None:
        got.append(ev)
    assert got == [AudioIn((frame(0),)), FinalizeIn(), AudioIn((frame(1), frame(2)), True), AudioIn((frame(3),)), CloseIn()]


def test_wake_only_on_empty_to_non_empty():
    b, wakes = make()
    b.put_nowait(FinalizeIn())
    b.put_nowait(FinalizeIn())
    b.take()
    b.take()
    b.put_nowait(FinalizeIn())
    assert wakes == [1, 1]


async def test_put_waits_at_the_memory_bound(autojump_clock):
    b, _ = make(budget=2, max_bytes=10_000)
    for _ in range(4):
        await b.put(FinalizeIn())  # 2 * budget events: full
    blocked = trio.Event()
    done = trio.Event()

    async def producer():
        blocked.set()
        await b.put(FinalizeIn())
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await blocked.wait()
        await trio.sleep(1)
        assert not done.is_set() and len(b) == 4
        b.take()
        await done.wait()
    assert len(b) == 4


async def test_put_waits_on_bytes_too(autojump_clock):
    b, _ = make(budget=100, max_bytes=8)
    await b.put(AudioIn.of(b"\x01" * 8))
    with trio.move_on_after(1) as scope:
        await b.put(AudioIn.of(b"\x01" * 2))
    assert scope.cancelled_caught
    b.take()
    await b.put(AudioIn.of(b"\x01" * 2))
