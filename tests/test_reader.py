"""Adapters read in a child process (adapters/reader.py) equal the in-process read exactly; format errors
keep their message; a child that dies, or stops answering, is replaced as often as that happens, and reads
never move into the server process."""

import os
import signal
import threading
import time

import pytest
import torch

from loraplex.adapters.formats import AdapterFormatError, read_adapter
from loraplex.adapters.reader import ReaderProcess
from loraplex.server.errors import InternalError, UnavailableError
from test_adapter_loading import base_config, base_dir, make_adapter  # noqa: F401  (fixtures)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture()
def reader(base_config):  # noqa: F811
    reader = ReaderProcess(base_config, max_rank=16, dtype=torch.float32)
    yield reader
    reader.close()


def test_child_read_equals_in_process_read(reader, base_dir, base_config, tmp_path):  # noqa: F811
    directory = tmp_path / "a"
    make_adapter(base_dir, directory, r=8, alpha=16, targets=TARGETS)
    got = reader.read(directory, "a")
    want = read_adapter(directory, "a", base_config, 16, torch.float32)
    assert got.modules.keys() == want.modules.keys() and got.alpha == want.alpha and got.rank == want.rank
    for key, module in want.modules.items():
        assert torch.equal(got.modules[key].a, module.a) and torch.equal(got.modules[key].b, module.b)
    assert reader._proc is not None and reader._proc.pid != os.getpid()    # it really ran elsewhere


def test_format_errors_keep_their_message(reader, base_dir, tmp_path):  # noqa: F811
    make_adapter(base_dir, tmp_path / "big", r=32)
    with pytest.raises(AdapterFormatError, match="32"):
        reader.read(tmp_path / "big", "big")
    make_adapter(base_dir, tmp_path / "ok", r=4)
    assert reader.read(tmp_path / "ok", "ok").rank == 4    # and it goes on


def test_a_dead_child_is_replaced(reader, base_dir, tmp_path):  # noqa: F811
    directory = tmp_path / "a"
    make_adapter(base_dir, directory, r=4)
    reader.read(directory, "a")
    first = reader._proc.pid
    os.kill(first, signal.SIGKILL)
    reader._proc.join(5)
    assert reader.read(directory, "a").rank == 4 and reader._proc.pid != first


def test_a_child_killed_again_and_again_is_replaced_every_time(reader, base_dir, tmp_path, monkeypatch):  # noqa: F811
    import loraplex.adapters.reader as module

    def never(*args, **kwargs):
        raise AssertionError("read in the server process")
    monkeypatch.setattr(module, "read_adapter", never)   # the child is a fresh process: unaffected
    make_adapter(base_dir, tmp_path / "a", r=4)
    pids = set()
    for _ in range(4):
        assert reader.read(tmp_path / "a", "a").rank == 4
        pids.add(reader._proc.pid)
        os.kill(reader._proc.pid, signal.SIGKILL)
        reader._proc.join(5)
    assert len(pids) == 4 and os.getpid() not in pids


def test_a_read_in_flight_when_the_child_dies_fails_clearly(reader, base_dir, tmp_path, monkeypatch):  # noqa: F811
    import loraplex.adapters.reader as module

    def never(*args, **kwargs):
        raise AssertionError("read in the server process")
    monkeypatch.setattr(module, "read_adapter", never)
    make_adapter(base_dir, tmp_path / "a", r=4)
    children = []
    for _ in range(2):                               # twice in a row: still a child for the next read
        reader.start()
        children.append(reader._proc.pid)
        os.kill(children[-1], signal.SIGSTOP)        # it takes the request but cannot answer
        errors = []
        thread = threading.Thread(target=lambda: _read_into(errors, reader, tmp_path / "a"))
        thread.start()
        time.sleep(0.5)
        os.kill(children[-1], signal.SIGKILL)
        thread.join(30)
        assert len(errors) == 1 and isinstance(errors[0], UnavailableError), errors
        assert "died (killed by SIGKILL) while reading adapter 'a'" in str(errors[0])
    assert reader.read(tmp_path / "a", "a").rank == 4 and reader._proc.pid not in children   # the next one works


def test_a_child_that_stops_answering_is_killed_and_replaced(base_config, base_dir, tmp_path,  # noqa: F811
                                                              monkeypatch):
    # a child stopped (or stuck on a hung filesystem) takes the request and never answers: after
    # read_timeout_s the read fails with UNAVAILABLE naming the adapter, and the child is killed, not reused
    import loraplex.adapters.reader as module

    def never(*args, **kwargs):
        raise AssertionError("read in the server process")
    monkeypatch.setattr(module, "read_adapter", never)
    make_adapter(base_dir, tmp_path / "a", r=4)
    reader = ReaderProcess(base_config, max_rank=16, dtype=torch.float32, read_timeout_s=0.5)
    try:
        hung = []
        for _ in range(2):                           # twice in a row: still a child for the next read
            reader.start()
            hung.append(reader._proc)
            os.kill(hung[-1].pid, signal.SIGSTOP)
            with pytest.raises(UnavailableError) as info:
                reader.read(tmp_path / "a", "a")
            assert "did not answer within 0.5 s while reading adapter 'a', so it was killed" in str(info.value)
            assert info.value.reason == "adapter_load"
            assert hung[-1].exitcode == -signal.SIGKILL           # killed, not left stopped
        reader.read_timeout_s = 300                  # a loaded machine may take more than 0.5 s for a real read
        assert reader.read(tmp_path / "a", "a").rank == 4
        assert reader._proc.pid not in [p.pid for p in hung] and reader._deaths == 0
    finally:
        reader.close()


def test_the_default_read_timeout_covers_the_largest_adapter_on_a_slow_disk(base_config):  # noqa: F811
    from loraplex.adapters.formats.peft_files import weights_limit

    reader = ReaderProcess(base_config, max_rank=64, dtype=torch.float32)
    slow_disk = 5e6                                  # bytes per second
    assert reader.read_timeout_s >= 60 + weights_limit(base_config, 64) / slow_disk
    with pytest.raises(ValueError, match="read_timeout_s must be positive"):
        ReaderProcess(base_config, max_rank=64, dtype=torch.float32, read_timeout_s=0)


def _read_into(errors, reader, directory):
    try:
        reader.read(directory, "a")
    except Exception as exc:
        errors.append(exc)


def test_no_child_can_start_so_the_read_fails_and_nothing_reads_here(base_config, base_dir, tmp_path,  # noqa: F811
                                                                      monkeypatch):
    # e.g. a main script without the `if __name__ == "__main__":` guard: every child start raises
    import multiprocessing.context

    def refuse(self):
        raise RuntimeError("An attempt has been made to start a new process before bootstrapping finished")
    monkeypatch.setattr(multiprocessing.context.ForkServerProcess, "start", refuse)
    pauses = []
    monkeypatch.setattr(time, "sleep", lambda s: pauses.append(round(s, 2)))
    reader = ReaderProcess(base_config, max_rank=16, dtype=torch.float32)
    try:
        reader.start()                                     # logs, does not raise
        make_adapter(base_dir, tmp_path / "a", r=4)
        for _ in range(3):
            with pytest.raises(InternalError, match="the adapter reader process could not start"):
                reader.read(tmp_path / "a", "a")
        assert reader._proc is None
        assert pauses[0] <= 0.05 and pauses[1:] == [0.1, 0.2]   # each failed start doubles the next pause
        monkeypatch.undo()                                 # starts work again: the next read gets a child
        assert reader.read(tmp_path / "a", "a").rank == 4 and reader._proc is not None
    finally:
        reader.close()
