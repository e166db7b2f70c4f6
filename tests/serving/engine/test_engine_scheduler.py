"""Dynamic SplitFuse scheduling, unit-tested with fake requests (no model): order, exact fill,
admission, head-of-line order, max_num_seqs, prefill-first mode, preemption, progress."""

from __future__ import annotations

import random

import pytest
from engine_testing import complete, fake_request, plan_of

from serving.engine.config import EngineConfig
from serving.engine.kv_cache import BlockManager
from serving.engine.request import RequestStatus
from serving.engine.scheduler import Scheduler


def make_scheduler(budget: int, num_blocks: int = 64, block_size: int = 4, **config) -> Scheduler:
    config = EngineConfig(
        max_num_batched_tokens=budget, block_size=block_size, num_blocks=num_blocks, **config
    )
    return Scheduler(config, BlockManager(num_blocks, block_size), budget)


def test_decodes_first_then_mid_prefill_then_waiting_and_the_pass_is_exactly_full() -> None:
    scheduler = make_scheduler(budget=10)
    a, b, c, d, e = (fake_request(n, p) for n, p in zip("ABCDE", (3, 3, 20, 5, 6), strict=True))
    for request in (a, b, c):
        scheduler.add(request)

    out = scheduler.schedule()
    assert plan_of(out) == [("A", 0, 3), ("B", 0, 3), ("C", 0, 4)]  # C split to fill the pass
    assert out.num_batched_tokens == 10
    assert [ch.samples for ch in out.chunks] == [True, True, False]
    complete(scheduler, out)
    scheduler.add(d)

    out = scheduler.schedule()
    assert plan_of(out) == [("A", 3, 1), ("B", 3, 1), ("C", 4, 8)]  # D arrived later: waits
    assert out.num_batched_tokens == 10
    assert list(scheduler.waiting) == [d] and d.status is RequestStatus.WAITING
    complete(scheduler, out)
    scheduler.add(e)

    out = scheduler.schedule()
    assert plan_of(out) == [("A", 4, 1), ("B", 4, 1), ("C", 12, 8)]
    assert out.chunks[-1].samples  # C's last prompt chunk samples its first token
    complete(scheduler, out)

    out = scheduler.schedule()
    assert plan_of(out) == [("A", 5, 1), ("B", 5, 1), ("C", 20, 1), ("D", 0, 5), ("E", 0, 2)]
    assert out.num_batched_tokens == 10
    assert scheduler.running == [a, b, c, d, e] and not scheduler.waiting
    complete(scheduler, out)

    out = scheduler.schedule()  # not enough work left to fill the pass
    assert plan_of(out) == [("A", 6, 1), ("B", 6, 1), ("C", 21, 1), ("D", 5, 1), ("E", 2, 4)]
    assert out.num_batched_tokens == 8


def test_one_decode_token_per_sequence_even_when_prompts_wait() -> None:
    scheduler = make_scheduler(budget=3)
    requests = [fake_request(f"r{i}", 1) for i in range(3)]
    for request in requests:
        scheduler.add(request)
    complete(scheduler, scheduler.schedule())
    scheduler.add(fake_request("late", 30))
    out = scheduler.schedule()
    assert plan_of(out) == [("r0", 1, 1), ("r1", 1, 1), ("r2", 1, 1)]
    assert [r.request_id for r in scheduler.waiting] == ["late"]


@pytest.mark.parametrize("chunked_prefill", [True, False])
def test_no_more_sequences_run_than_the_budget_has_tokens(chunked_prefill: bool) -> None:
    """Else the decodes past the budget would wait behind the others for as long as those run
    (whole prompts first admits one prompt a pass whatever the budget, so it would). Without
    chunking, a pass that runs whole prompts pauses every decode, by design; every other pass
    takes them all."""
    scheduler = make_scheduler(budget=2, chunked_prefill=chunked_prefill)
    for name in "ABCD":
        scheduler.add(fake_request(name, 4, max_tokens=5))
    passes = 0
    while scheduler.has_work:
        decoding = {r.request_id for r in scheduler.running if r.num_pending_tokens == 1}
        out = scheduler.schedule()
        assert len(scheduler.running) <= 2
        plan = plan_of(out)
        if chunked_prefill or all(num == 1 for _, _, num in plan):
            assert decoding <= {request_id for request_id, _, _ in plan}  # none left out
        complete(scheduler, out)
        passes += 1
    assert scheduler.max_running == 2 and passes >= 10  # all four ran, two at a time


def test_a_prompt_is_admitted_only_when_the_cache_holds_all_of_it_and_keeps_its_place() -> None:
    scheduler = make_scheduler(budget=64, num_blocks=5, block_size=4)  # 20 positions
    a, b, c = fake_request("A", 12), fake_request("B", 9), fake_request("C", 2)
    scheduler.add(a)
    out = scheduler.schedule()
    assert plan_of(out) == [("A", 0, 12)]
    assert len(a.block_table) == 3 and scheduler.blocks.num_free_blocks == 2
    complete(scheduler, out)
    scheduler.add(b)
    scheduler.add(c)

    out = scheduler.schedule()
    # A's decode takes a 4th block; B needs 3 of the 1 left; C would fit but must not overtake.
    assert plan_of(out) == [("A", 12, 1)]
    assert list(scheduler.waiting) == [b, c]
    assert b.block_table == [] and c.block_table == []
    assert b.status is RequestStatus.WAITING and scheduler.blocks.num_free_blocks == 1
    complete(scheduler, out)

    scheduler.finish(a)
    assert a.block_table == [] and scheduler.blocks.num_free_blocks == 5
    assert a.status is RequestStatus.FINISHED
    out = scheduler.schedule()
    assert plan_of(out) == [("B", 0, 9), ("C", 0, 2)]
    assert scheduler.running == [b, c]


def test_max_num_seqs_caps_the_running_set() -> None:
    scheduler = make_scheduler(budget=64, max_num_seqs=2)
    a, b, c = fake_request("A", 3), fake_request("B", 3), fake_request("C", 3)
    for request in (a, b, c):
        scheduler.add(request)
    out = scheduler.schedule()
    assert plan_of(out) == [("A", 0, 3), ("B", 0, 3)]  # budget left, but two already run
    assert list(scheduler.waiting) == [c]
    complete(scheduler, out)
    scheduler.finish(a)
    out = scheduler.schedule()
    assert plan_of(out) == [("B", 3, 1), ("C", 0, 3)]
    assert len(scheduler.running) == 2


def test_prefill_first_mode_runs_whole_prompts_and_pauses_decodes() -> None:
    scheduler = make_scheduler(budget=8, chunked_prefill=False)
    scheduler.add(fake_request("A", 5))
    out = scheduler.schedule()
    assert plan_of(out) == [("A", 0, 5)]
    complete(scheduler, out)

    scheduler.add(fake_request("B", 12))
    scheduler.add(fake_request("C", 4))
    out = scheduler.schedule()
    assert plan_of(out) == [("B", 0, 12)]  # whole, over the budget; A's decode waits
    complete(scheduler, out)
    out = scheduler.schedule()
    assert plan_of(out) == [("C", 0, 4)]  # C did not fit beside B; decodes still wait
    complete(scheduler, out)

    out = scheduler.schedule()
    assert plan_of(out) == [("A", 5, 1), ("B", 12, 1), ("C", 4, 1)]  # decodes resume
    complete(scheduler, out)

    for name, length in (("D", 3), ("E", 4), ("F", 2)):
        scheduler.add(fake_request(name, length))
    out = scheduler.schedule()
    assert plan_of(out) == [("D", 0, 3), ("E", 0, 4)]  # F (2) would overflow the 8 tokens
    complete(scheduler, out)
    out = scheduler.schedule()
    assert plan_of(out) == [("F", 0, 2)]
    complete(scheduler, out)
    out = scheduler.schedule()
    assert [name for name, _, num in plan_of(out) if num == 1] == list("ABCDEF")
    assert out.num_batched_tokens == 6


def test_the_same_workload_is_split_with_chunked_prefill() -> None:
    scheduler = make_scheduler(budget=8)
    scheduler.add(fake_request("A", 5))
    complete(scheduler, scheduler.schedule())
    scheduler.add(fake_request("B", 12))
    out = scheduler.schedule()
    assert plan_of(out) == [("A", 5, 1), ("B", 0, 7)]


def test_a_decode_without_a_free_block_preempts_the_newest_running_request() -> None:
    scheduler = make_scheduler(budget=64, num_blocks=5, block_size=4)
    a, b, c = fake_request("A", 8), fake_request("B", 3), fake_request("C", 8)
    for request in (a, b, c):
        scheduler.add(request)
    out = scheduler.schedule()
    assert plan_of(out) == [("A", 0, 8), ("B", 0, 3), ("C", 0, 8)]
    assert scheduler.blocks.num_free_blocks == 0
    complete(scheduler, out)  # A and C now need a 3rd block to decode; B's fits its block
    b_blocks = list(b.block_table)

    out = scheduler.schedule()
    assert out.preempted == [c]
    assert plan_of(out) == [("A", 8, 1), ("B", 3, 1)]  # no chunk of C left in the plan
    assert c.status is RequestStatus.WAITING
    assert c.block_table == [] and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert c.output_ids == [7]  # kept: recomputed, not resampled
    assert list(scheduler.waiting) == [c] and scheduler.running == [a, b]
    assert b.block_table == b_blocks and b.num_preemptions == 0
    assert len(a.block_table) == 3 and scheduler.blocks.num_free_blocks == 1
    complete(scheduler, out)

    scheduler.add(fake_request("D", 1))  # arrives after the preemption: C stays ahead
    out = scheduler.schedule()
    assert plan_of(out) == [("A", 9, 1), ("B", 4, 1)]  # C needs 3 blocks, D must not overtake
    assert [r.request_id for r in scheduler.waiting] == ["C", "D"]
    complete(scheduler, out)

    scheduler.finish(a)
    out = scheduler.schedule()
    # C recomputes its prompt and its generated token, and samples its next token.
    assert plan_of(out) == [("B", 5, 1), ("C", 0, 9)]  # B took a block at step 3: D waits
    assert out.chunks[1].samples and out.preempted == []
    assert scheduler.running == [b, c] and len(c.block_table) == 3
    assert [r.request_id for r in scheduler.waiting] == ["D"]
    assert scheduler.blocks.num_free_blocks == 0


def test_a_decode_that_is_itself_the_newest_preempts_itself() -> None:
    scheduler = make_scheduler(budget=64, num_blocks=2, block_size=4)
    a, b = fake_request("A", 3), fake_request("B", 4)
    scheduler.add(a)
    scheduler.add(b)
    complete(scheduler, scheduler.schedule())  # B (5 tokens) needs a 2nd block, A does not
    out = scheduler.schedule()
    assert out.preempted == [b]
    assert plan_of(out) == [("A", 3, 1)]
    assert scheduler.running == [a] and list(scheduler.waiting) == [b]
    assert scheduler.blocks.num_free_blocks == 1


def test_finish_forgets_waiting_and_running_requests() -> None:
    scheduler = make_scheduler(budget=4, num_blocks=8)
    a, b = fake_request("A", 10), fake_request("B", 3)
    scheduler.add(a)
    scheduler.add(b)
    out = scheduler.schedule()
    assert plan_of(out) == [("A", 0, 4)]
    complete(scheduler, out)
    assert len(a.block_table) == 3
    scheduler.finish(b)  # still waiting
    scheduler.finish(a)  # mid-prefill
    assert not scheduler.has_work
    assert scheduler.blocks.num_free_blocks == 8
    assert scheduler.schedule().is_empty


def _kind(scheduler: Scheduler, request) -> int:
    if request in scheduler.running:
        return 0 if request.num_pending_tokens == 1 else 1
    return 2


def simulate(seed: int) -> int:
    """Arrivals, chunking, admission, preemption and finishing at random: every pass with work
    schedules something, the block accounting holds, and everything finishes. Returns the
    number of preemptions."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    num_blocks = rng.randint(3, 40)
    capacity = num_blocks * block_size
    budget = rng.choice([1, 2, 3, 7, 13, 64, 512])
    chunked = seed % 3 != 0
    max_num_seqs = rng.choice([1, 2, 4, 64])
    scheduler = make_scheduler(
        budget, num_blocks, block_size, chunked_prefill=chunked, max_num_seqs=max_num_seqs
    )
    pending = [
        fake_request(f"r{i}", rng.randint(1, capacity - 1), max_tokens=rng.randint(1, 12))
        for i in range(25)
    ]
    everything = list(pending)
    num_preemptions = 0
    for _ in range(20000):
        for _ in range(rng.choice([0, 0, 1, 2])):
            if pending:
                scheduler.add(pending.pop(0))
        if not scheduler.has_work:
            if not pending:
                break
            continue
        before = {id(r): _kind(scheduler, r) for r in [*scheduler.running, *scheduler.waiting]}
        waiting_before = list(scheduler.waiting)
        out = scheduler.schedule()
        assert not out.is_empty, "requests wait but nothing runs"
        num_preemptions += len(out.preempted)
        requests = [c.request for c in out.chunks]
        assert len({id(r) for r in requests}) == len(requests)
        for chunk in out.chunks:
            request = chunk.request
            assert request.status is RequestStatus.RUNNING
            assert chunk.num_tokens >= 1
            assert chunk.start == request.num_computed_tokens
            assert chunk.start + chunk.num_tokens <= request.num_tokens
            assert len(request.block_table) * block_size >= chunk.start + chunk.num_tokens
        # decodes, then mid-prefill, then new prompts; new prompts in queue order
        kinds = [before[id(r)] for r in requests]
        assert kinds == sorted(kinds)
        admitted = [r for r in requests if before[id(r)] == 2]
        assert admitted == waiting_before[: len(admitted)]
        assert len(scheduler.running) <= max_num_seqs
        if chunked:
            assert out.num_batched_tokens <= budget
            if out.num_batched_tokens < budget:  # not full: no work could have been added
                for request in scheduler.running:
                    assert request in requests
                    chunk = next(c for c in out.chunks if c.request is request)
                    assert chunk.start + chunk.num_tokens == request.num_tokens
                if scheduler.waiting and len(scheduler.running) < max_num_seqs:
                    head = scheduler.waiting[0]
                    needed = scheduler.blocks.blocks_needed(head.num_tokens, [])
                    assert not scheduler.blocks.can_allocate(needed)
        else:
            prompts = [c for c in out.chunks if before[id(c.request)] == 2]
            assert not prompts or len(prompts) == len(out.chunks)  # decodes pause for prompts
            assert all(c.start == 0 and c.samples for c in prompts)  # whole prompts only
            if len(out.chunks) > 1:
                assert out.num_batched_tokens <= budget
        held = [b for r in scheduler.running for b in r.block_table]
        assert len(held) == len(set(held))
        assert len(held) + scheduler.blocks.num_free_blocks == num_blocks
        assert all(not r.block_table for r in scheduler.waiting)
        complete(scheduler, out, capacity)
    else:
        raise AssertionError("the workload did not finish")
    assert all(r.status is RequestStatus.FINISHED for r in everything)
    assert scheduler.blocks.num_free_blocks == num_blocks
    return num_preemptions


@pytest.mark.parametrize("seed", range(12))
def test_random_workloads_always_make_progress(seed: int) -> None:
    simulate(seed)


def test_the_random_workloads_include_preemptions() -> None:
    assert sum(simulate(seed) for seed in range(12)) > 0
