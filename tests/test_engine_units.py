"""Pure pieces, table-tested: stop sequences, text hold-back, KV blocks, scheduling, config."""

import argparse

import pytest

from loraplex.server.config import ServerConfig, add_config_flags, config_from_args
from loraplex.server.engine.kv_cache import BlockManager
from loraplex.server.engine.prompt import truncate
from loraplex.server.engine.request import GenerationRequest, StoppingParams
from loraplex.server.engine.scheduler import Scheduler
from loraplex.server.engine.sequence import Sequence, Status
from loraplex.server.engine.stopping import TextTracker, find_stop, held_back
from loraplex.server.errors import InvalidArgumentError, ResourceExhaustedError


@pytest.mark.parametrize("text, stops, start, expected", [
    ("hello world", ["world"], 0, (6, "world")),
    ("hello world", ["xyz"], 0, None),
    ("a b c b", ["b", "c"], 0, (2, "b")),
    ("a b c b", ["c", "b"], 4, (4, "c")),          # only matches ending after `start`
    ("abcabc", ["bc"], 4, (4, "bc")),
    ("ab\n\ncd", ["\n\n"], 3, (2, "\n\n")),       # a match straddling the checked boundary is found
])
def test_find_stop(text, stops, start, expected):
    assert find_stop(text, stops, start) == expected


@pytest.mark.parametrize("text, stops, expected", [
    ("hello", ["lo!"], 2),      # "lo" could become "lo!"
    ("hello", ["xyz"], 0),
    ("hello\n", ["\n\n"], 1),
    ("abc", ["abcd", "c"], 3),
    ("", ["ab"], 0),
])
def test_held_back(text, stops, expected):
    assert held_back(text, stops) == expected


def tracker_run(pieces, stops, include=False):
    """Feeds token-by-token text; returns the emitted chunks and the stop found."""
    tracker = TextTracker(lambda ids: "".join(pieces[i] for i in ids), stops, include)
    chunks, ids = [], []
    for i in range(len(pieces)):
        ids.append(i)
        chunk, stop = tracker.update(ids)
        chunks.append(chunk)
        if stop:
            return chunks, stop
    chunks.append(tracker.flush())
    return chunks, None


def test_tracker_holds_back_possible_stop_prefix_then_releases():
    chunks, stop = tracker_run(["Hi", " E", "ND", "?"], ["END."])
    assert stop is None
    assert chunks == ["Hi", " ", "", "END?", ""]


@pytest.mark.parametrize("include, text", [(False, "one two "), (True, "one two STOP")])
def test_tracker_cuts_at_stop_sequence(include, text):
    chunks, stop = tracker_run(["one", " two", " ST", "OP", " more"], ["STOP"], include)
    assert stop == "STOP"
    assert "".join(chunks) == text


BYTES = {0: b"caf", 1: b"\xc3", 2: b"\xa9!", 3: b" ok", 4: b"\xe2\x82"}


def byte_decode(ids):
    return b"".join(BYTES[i] for i in ids).decode("utf-8", errors="replace")


def test_tracker_waits_for_complete_utf8():
    # "é" is split over tokens 1 and 2; alone, token 1 decodes to U+FFFD and must not be emitted
    tracker = TextTracker(byte_decode)
    ids = [0, 1, 2, 3]
    assert [tracker.update(ids[:n])[0] for n in (1, 2, 3, 4)] == ["caf", "", "é!", " ok"]


def test_tracker_flushes_an_unfinished_character_at_the_end():
    tracker = TextTracker(byte_decode)
    assert tracker.update([0])[0] == "caf"
    assert tracker.update([0, 4])[0] == ""
    assert tracker.flush() == "\ufffd"


def test_tracker_decodes_a_window_not_the_whole_text():
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return "".join(f"<{i}>" for i in ids)

    tracker = TextTracker(decode)
    ids = list(range(200))
    text = "".join(tracker.update(ids[:n])[0] for n in range(1, 201))
    assert text == decode(ids)
    assert max(calls[:-1]) <= 2


def test_truncate_keeps_last_tokens():
    assert truncate([1, 2, 3, 4], 2) == [3, 4]
    assert truncate([1, 2, 3, 4], 0) == [1, 2, 3, 4]
    assert truncate([1, 2], 5) == [1, 2]


def test_block_manager_grows_and_releases():
    blocks = BlockManager(num_blocks=4, block_size=16)
    table = []
    blocks.grow(table, 17)
    assert len(table) == 2 and blocks.num_free == 2
    blocks.grow(table, 32)
    assert len(table) == 2
    assert not blocks.can_grow(table, 65)
    with pytest.raises(MemoryError):
        blocks.grow(table, 65)
    blocks.release(table)
    assert table == [] and blocks.num_free == 4 and blocks.usage == 0.0


def seq(n_prompt: int, max_new: int = 8) -> Sequence:
    req = GenerationRequest(prompt="x", stopping=StoppingParams(max_new_tokens=max_new))
    return Sequence(req, list(range(n_prompt)), 0, TextTracker(str), lambda out: None, 512)


def test_scheduler_prefills_first_then_decodes():
    s = Scheduler(BlockManager(8, 4), max_batch_size=2, max_prefill_tokens=100, max_queue_size=4)
    a, b, c = seq(3), seq(3), seq(3)
    for x in (a, b, c):
        s.add(x)
    batch = s.schedule()
    assert batch.prefill and batch.seqs == [a, b]          # batch room for two
    batch = s.schedule()
    assert not batch.prefill and batch.seqs == [a, b]      # c waits for room
    s.finish(a)
    batch = s.schedule()
    assert batch.prefill and batch.seqs == [c]


def test_scheduler_respects_prefill_token_budget():
    s = Scheduler(BlockManager(64, 4), max_batch_size=8, max_prefill_tokens=10, max_queue_size=8)
    a, b = seq(6), seq(6)
    s.add(a), s.add(b)
    assert s.schedule().seqs == [a]
    assert s.schedule().seqs == [b]


def sampled(x: Sequence, token: int) -> None:
    """What the engine does after a step that gave x a token: all its tokens are in the cache, then the new one."""
    x.fed = x.num_tokens
    x.output_ids.append(token)


def fed(batch) -> None:
    """What the engine does after a mixed step: each sequence's fed count, and a token for those that sample."""
    for i, x in enumerate(batch.seqs):
        x.fed = batch.fed_after(i)
        if x.fed == x.num_tokens:
            x.output_ids.append(0)


def test_chunked_prefill_cuts_prompts_at_fixed_positions_beside_every_decode():
    s = Scheduler(BlockManager(64, 4), max_batch_size=8, max_prefill_tokens=100, max_queue_size=8,
                  prefill_chunk_tokens=8)
    a, b, c = seq(3), seq(19), seq(5)
    for x in (a, b, c):
        s.add(x)
    steps = []
    for _ in range(5):
        batch = s.schedule()
        steps.append(([x for x in batch.seqs[:batch.num_decodes]], list(zip(batch.seqs[batch.num_decodes:],
                                                                              batch.pieces or []))))
        fed(batch)
    # a's whole prompt (3) leaves 5 of the budget, too few for b's first piece (8): b starts next, goes on at
    # 8 and 16 (fixed cuts, never where room is left), and c waits until the budget has room for its whole
    # first piece; a decodes in every step once it has a token
    assert steps[0] == ([], [(a, (0, 3))])
    assert steps[1] == ([a], [(b, (0, 8))])
    assert steps[2] == ([a], [(b, (8, 16))])
    assert steps[3] == ([a], [(b, (16, 19)), (c, (0, 5))])
    assert steps[4][0] == [a, b, c] and steps[4][1] == []
    assert all(sum(end - start for _, (start, end) in pieces) <= 8 for _, pieces in steps)


def test_scheduler_preempts_newest_when_blocks_run_out():
    s = Scheduler(BlockManager(2, 4), max_batch_size=4, max_prefill_tokens=100, max_queue_size=4)
    a, b = seq(4), seq(4)
    s.add(a), s.add(b)
    assert s.schedule().seqs == [a, b]          # each takes its one block
    sampled(a, 7)
    sampled(b, 7)                               # both need a second block, none is free
    batch = s.schedule()
    assert batch.seqs == [a] and b.status is Status.WAITING and s.preemptions == 1
    assert s.blocks.num_free == 0 and b.block_table == []


def test_preempted_sequence_is_saved_then_resumed_into_new_blocks_without_a_prefill():
    s = Scheduler(BlockManager(2, 4), max_batch_size=4, max_prefill_tokens=100, max_queue_size=4)
    a, b = seq(4), seq(4)
    s.add(a), s.add(b)
    s.schedule()
    sampled(a, 7)
    sampled(b, 7)
    old_table = list(b.block_table)
    s.schedule()                                       # b is preempted
    assert s.take_kv_moves() == ([(b, old_table)], []) and b.swapped
    s.finish(a)                                        # its blocks free again
    batch = s.schedule()
    assert not batch.prefill and batch.seqs == [b]     # resumed straight into decode
    assert s.take_kv_moves() == ([], [b]) and not b.swapped and len(b.block_table) == 2


def test_preempted_sequence_is_recomputed_when_host_rows_run_out():
    s = Scheduler(BlockManager(2, 4), max_batch_size=4, max_prefill_tokens=100, max_queue_size=4)
    s.swap_rows = 0
    a, b = seq(4), seq(4)
    s.add(a), s.add(b)
    s.schedule()
    sampled(a, 7)
    sampled(b, 7)
    s.schedule()
    assert s.take_kv_moves() == ([], []) and not b.swapped
    s.finish(a)
    batch = s.schedule()
    assert batch.prefill and batch.seqs == [b]         # prompt + output prefilled again


def test_scheduler_refuses_when_queue_full():
    s = Scheduler(BlockManager(4, 4), max_batch_size=1, max_prefill_tokens=100, max_queue_size=1)
    s.add(seq(2))
    with pytest.raises(ResourceExhaustedError, match="queue is full"):
        s.add(seq(2))


def test_finish_frees_blocks_of_waiting_and_running():
    s = Scheduler(BlockManager(4, 4), max_batch_size=1, max_prefill_tokens=100, max_queue_size=4)
    a, b = seq(4), seq(4)
    s.add(a), s.add(b)
    s.schedule()
    s.finish(b)     # waiting
    s.finish(a)     # running
    assert s.blocks.num_free == 4 and not s.has_work()


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0 + 1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_sampling_params_name_the_field(kwargs, field):
    from loraplex.server.engine.request import SamplingParams
    with pytest.raises(InvalidArgumentError, match=field):
        SamplingParams(**kwargs)


def test_config_flags_and_environment():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--max-batch-size", "7", "--no-warmup"])
    config = config_from_args(args, environ={"LORAPLEX_MAX_BATCH_SIZE": "3", "LORAPLEX_PORT": "1234"})
    assert config.max_batch_size == 7 and config.port == 1234 and config.warmup is False
    with pytest.raises(ValueError, match="max_batch_size"):
        ServerConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="max_step_tokens needs prefill_chunk_tokens"):
        ServerConfig(max_step_tokens=48)


def test_max_step_tokens_counts_the_decodes_of_a_step():
    """--max-step-tokens: prompt pieces fill what a step's decodes leave of it (several pieces when few
    sequences decode, one when many do), cut at the same fixed positions; one piece always fits."""
    s = Scheduler(BlockManager(64, 4), max_batch_size=8, max_prefill_tokens=100, max_queue_size=8,
                  prefill_chunk_tokens=4, max_step_tokens=10)
    prompts = [seq(n) for n in (4, 4, 4, 9, 13, 4)]
    for x in prompts:
        s.add(x)
    steps = []
    while any(x.fed < len(x.prompt_ids) for x in prompts):
        batch = s.schedule()
        pieces = batch.pieces or []
        steps.append((batch.num_decodes, pieces))
        assert all(start % 4 == 0 and (end % 4 == 0 or end == len(x.prompt_ids))
                   for x, (start, end) in zip(batch.seqs[batch.num_decodes:], pieces))
        fed(batch)
    budgets = [(decodes, sum(end - start for start, end in pieces), len(pieces)) for decodes, pieces in steps]
    assert all(decodes + tokens <= 10 or count == 1 for decodes, tokens, count in budgets), budgets
    assert budgets[:3] == [(0, 8, 2), (2, 8, 2), (3, 4, 1)]   # 10 - 3 decodes leave room for one piece of 4
    assert any(decodes == 4 and count == 1 for decodes, _, count in budgets)


def test_while_paused_holds_the_loop_for_at_most_its_limit():
    """Chores.while_paused: the loop starts no step while fn runs, but for longest_s at most (a read on a hung
    disk must not stop decoding)."""
    import threading
    import time

    from loraplex.server.engine.chores import Chores

    chores, stop, steps = Chores(lambda: None), threading.Event(), []

    def loop():
        chores.loop_started()
        while not stop.is_set():
            chore = chores.take()
            if chore is not None:
                chore()
            steps.append(time.monotonic())
            time.sleep(0.005)
        chores.loop_ended()
    thread = threading.Thread(target=loop)
    thread.start()
    try:
        def timed(seconds):
            start = time.monotonic()
            time.sleep(seconds)
            return start, time.monotonic()
        start, end = chores.while_paused(lambda: timed(0.2), longest_s=5)
        assert not [t for t in steps if start < t < end]          # held for the whole of fn
        start, end = chores.while_paused(lambda: timed(0.6), longest_s=0.1)
        assert [t for t in steps if start + 0.3 < t < end]        # let go after 0.1 s while fn still ran
    finally:
        stop.set()
        thread.join()
