import trio

from scheduler.edge.ratelimit import TokenBucket


async def test_bucket_allows_burst_then_paces(autojump_clock):
    bucket = TokenBucket(rate=10, burst=5)
    start = trio.current_time()
    for _ in range(5):
        await bucket.take()
    assert trio.current_time() == start and bucket.waited == 0
    for _ in range(10):
        await bucket.take()
    assert abs(trio.current_time() - start - 1.0) < 1e-6  # 10 more at 10 per second
    assert bucket.waited == 10


async def test_bucket_refills_while_idle(autojump_clock):
    bucket = TokenBucket(rate=10, burst=3)
    for _ in range(3):
        await bucket.take()
    await trio.sleep(10)
    start = trio.current_time()
    for _ in range(3):
        await bucket.take()
    assert trio.current_time() == start  # refilled up to the burst, not beyond
    await bucket.take()
    assert trio.current_time() > start
