"""Adapters read in a child process (adapters/reader.py) equal the in-process read exactly; format errors
keep their message; a child that dies is replaced; with no child at all, reads happen in the server."""

import os
import signal

import pytest
import torch

from loraplex.adapters.formats import AdapterFormatError, read_adapter
from loraplex.adapters.reader import ReaderProcess
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


def test_no_child_can_start_so_reads_happen_here(base_config, base_dir, tmp_path, monkeypatch):  # noqa: F811
    # e.g. a main script without the `if __name__ == "__main__":` guard: every child start raises
    import multiprocessing.context

    def refuse(self):
        raise RuntimeError("An attempt has been made to start a new process before bootstrapping finished")
    monkeypatch.setattr(multiprocessing.context.ForkServerProcess, "start", refuse)
    reader = ReaderProcess(base_config, max_rank=16, dtype=torch.float32)
    try:
        reader.start()                                     # logs, does not raise
        make_adapter(base_dir, tmp_path / "a", r=4)
        assert reader.read(tmp_path / "a", "a").rank == 4
        assert reader._proc is None and reader._in_process
    finally:
        reader.close()
