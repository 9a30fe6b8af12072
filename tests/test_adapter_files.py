"""Adapter files are opened only inside the adapter's directory, as regular files, with their sizes checked
before a byte is read; every refusal is FAILED_PRECONDITION, names the adapter and the problem, and never
shows the server's paths. Real files throughout: sparse files for huge sizes, real symlinks and FIFOs."""

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile

import grpc
import pytest

from loraplex.adapters.formats import AdapterFormatError, read_adapter
from loraplex.adapters.formats.peft_files import MAX_CONFIG_BYTES, weights_limit
from loraplex.adapters.loader import AdapterLoader, ReadSettings
from loraplex.adapters.registry import AdapterRegistry
from loraplex.adapters.roots import AdapterRoots
from loraplex.adapters.tensor_file import open_tensors
from loraplex.adapters.watch import AdapterWatcher
from loraplex.server.errors import FailedPreconditionError
from loraplex.server.rpc.errors import status_for
from test_adapter_loading import adapter_dir, base_config, base_dir, make_adapter  # noqa: F401  (fixtures)

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture()
def root(adapter_dir, tmp_path):  # noqa: F811
    """A root holding a copy of the good adapter as "a", and a directory outside it."""
    shutil.copytree(adapter_dir, tmp_path / "root" / "a")
    (tmp_path / "outside").mkdir()
    return tmp_path / "root"


def refused(directory, config, tmp_path, words, max_rank=64) -> str:
    with pytest.raises(AdapterFormatError) as info:
        read_adapter(directory, "a", config, max_rank=max_rank)
    message = str(info.value)
    assert words in message and str(tmp_path) not in message, message
    return message


# --- sizes, before any read ---------------------------------------------------------------------------

def test_weights_larger_than_any_legal_adapter_are_refused_unread(root, base_config, tmp_path):  # noqa: F811
    os.truncate(root / "a" / WEIGHTS, 30 * 10**9)           # sparse: 30 GB that take no disk
    refused(root / "a", base_config, tmp_path, f"{WEIGHTS} is 30000000000 bytes, more than the "
            f"{weights_limit(base_config, 64)} bytes the largest adapter of rank 64 for this base model takes")
    os.truncate(root / "a" / WEIGHTS, weights_limit(base_config, 8) + 1)   # just over, at a smaller maximum
    refused(root / "a", base_config, tmp_path, "the largest adapter of rank 8", max_rank=8)


def test_weights_limit_holds_the_largest_legal_adapter(base_dir, base_config, tmp_path):  # noqa: F811
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    make_adapter(base_dir, tmp_path / "a", r=16, targets=targets)
    assert read_adapter(tmp_path / "a", "a", base_config, max_rank=16).rank == 16


def test_config_over_the_limit_is_refused_unread(root, base_config, tmp_path):  # noqa: F811
    path = root / "a" / CONFIG
    text = path.read_text()
    path.write_text(text + " " * (MAX_CONFIG_BYTES - len(text) + 1))    # valid JSON, one byte too many
    refused(root / "a", base_config, tmp_path, f"{CONFIG} is {MAX_CONFIG_BYTES + 1} bytes, more than the "
                                               f"{MAX_CONFIG_BYTES} bytes a config may take")
    os.truncate(path, 2 * 10**9)
    refused(root / "a", base_config, tmp_path, f"{CONFIG} is 2000000000 bytes")


def test_a_file_over_2_gib_reads_past_2_gib(tmp_path):
    # [filler: 2 GiB + 4 KiB of a hole][tail: 4 float32 written for real]; one readinto stops at 2 GiB - 4 KiB
    filler = 2**31 + 4096
    header = json.dumps({"filler": {"dtype": "U8", "shape": [filler], "data_offsets": [0, filler]},
                         "tail": {"dtype": "F32", "shape": [4], "data_offsets": [filler, filler + 16]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(tmp_path / WEIGHTS, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.seek(8 + len(header) + filler)
        f.write(struct.pack("<4f", 1.5, -2.0, 3.25, 4.0))
    with open_tensors(tmp_path, WEIGHTS, 2**32, "allowed") as f:
        assert f.get_tensor("tail").tolist() == [1.5, -2.0, 3.25, 4.0]


# --- what a file is and where it leads -----------------------------------------------------------------

@pytest.mark.parametrize("name", [CONFIG, WEIGHTS])
def test_symlink_out_of_the_adapter_is_refused(root, base_config, tmp_path, name):  # noqa: F811
    shutil.move(root / "a" / name, tmp_path / "outside" / name)        # the very same bytes, outside
    os.symlink(tmp_path / "outside" / name, root / "a" / name)
    refused(root / "a", base_config, tmp_path, f"{name} is a symlink that leads out of the adapter's directory")
    os.unlink(root / "a" / name)
    os.symlink(os.path.relpath(tmp_path / "outside" / name, root / "a"), root / "a" / name)   # relative, too
    refused(root / "a", base_config, tmp_path, "leads out of the adapter's directory")


def test_symlink_inside_the_adapter_is_followed(root, base_config):  # noqa: F811
    os.rename(root / "a" / WEIGHTS, root / "a" / "weights-v2.safetensors")
    os.symlink("weights-v2.safetensors", root / "a" / WEIGHTS)
    assert read_adapter(root / "a", "a", base_config, max_rank=64).rank == 4


@pytest.mark.parametrize("name", [CONFIG, WEIGHTS])
def test_symlink_loop_is_refused(root, base_config, tmp_path, name):  # noqa: F811
    os.unlink(root / "a" / name)
    os.symlink(name, root / "a" / name)
    refused(root / "a", base_config, tmp_path, f"{name} is a symlink loop")


def test_directory_or_fifo_in_place_of_a_file_is_refused(root, base_config, tmp_path):  # noqa: F811
    os.unlink(root / "a" / WEIGHTS)
    os.mkfifo(root / "a" / WEIGHTS)                  # opening it for reading must not wait for a writer
    refused(root / "a", base_config, tmp_path, f"{WEIGHTS} is not a regular file")
    os.unlink(root / "a" / CONFIG)
    os.mkdir(root / "a" / CONFIG)
    refused(root / "a", base_config, tmp_path, f"{CONFIG} is not a regular file")


_UNREADABLE = """
import os, pickle, sys
from loraplex.adapters.formats import AdapterFormatError, read_adapter
config = pickle.loads(bytes.fromhex(sys.argv[2]))
if os.geteuid() == 0:       # root reads anything: read as nobody (imports done first: the Python may be root's)
    os.setgid(65534)
    os.setuid(65534)
try:
    read_adapter(sys.argv[1], "a", config, max_rank=64)
except AdapterFormatError as exc:
    print("refused:", exc)
"""


@pytest.mark.parametrize("name", [CONFIG, WEIGHTS])
def test_unreadable_file_is_refused(adapter_dir, base_config, name):  # noqa: F811
    scratch = tempfile.mkdtemp(prefix="loraplex-perm-")        # pytest's tmp_path is closed to other users
    try:
        os.chmod(scratch, 0o755)
        directory = shutil.copytree(adapter_dir, os.path.join(scratch, "a"))
        os.chmod(directory, 0o755)
        for file in os.listdir(directory):
            os.chmod(os.path.join(directory, file), 0o000 if file == name else 0o644)
        run = subprocess.run([sys.executable, "-c", _UNREADABLE, directory, pickle.dumps(base_config).hex()],
                             capture_output=True, text=True, timeout=120)
        assert f"refused: {name} cannot be read: permission denied" in run.stdout, run.stdout + run.stderr
        assert scratch not in run.stdout
    finally:
        shutil.rmtree(scratch)


# --- statuses through the registry, and the watcher -----------------------------------------------------

@pytest.fixture()
def loader(root, base_config):  # noqa: F811
    """Reads through its reader processes, as the server does; no slot buffers (nothing here is pinned)."""
    loader = AdapterLoader(AdapterRegistry(num_slots=2, host_cache_bytes=2**30), AdapterRoots([root]), None,
                           ReadSettings(base_config, max_rank=64))
    yield loader
    loader.stop()


def break_loop_dir(root, adapter_id):
    shutil.rmtree(root / adapter_id)
    os.symlink(adapter_id, root / adapter_id)


def break_loop_file(root, adapter_id):
    os.unlink(root / adapter_id / CONFIG)
    os.symlink(CONFIG, root / adapter_id / CONFIG)


def break_huge(root, adapter_id):
    os.truncate(root / adapter_id / WEIGHTS, 30 * 10**9)


@pytest.mark.parametrize("breaks, words", [(break_loop_dir, "its directory is a symlink loop"),
                                           (break_loop_file, f"{CONFIG} is a symlink loop"),
                                           (break_huge, f"{WEIGHTS} is 30000000000 bytes")])
def test_bad_adapter_is_failed_precondition(root, loader, tmp_path, breaks, words):
    breaks(root, "a")
    for call in (lambda: loader.bind("a"), lambda: loader.load("a").result(60)):
        try:
            call()
        except FailedPreconditionError as exc:
            code, message = status_for(exc)
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert "'a'" in message and words in message and str(tmp_path) not in message, message
            return
    pytest.fail("the broken adapter was served")


def test_watcher_survives_one_bad_adapter(root, loader, base_dir):  # noqa: F811
    make_adapter(base_dir, root / "b", r=4)
    make_adapter(base_dir, root / "new", r=8, seed=3)
    for adapter_id in ("a", "b"):
        loader.load(adapter_id).result(60)
    watcher = AdapterWatcher(loader.changed_on_disk, loader.load, interval=3600)
    try:
        break_loop_dir(root, "a")
        for name in (CONFIG, WEIGHTS):
            shutil.copy(root / "new" / name, root / "b" / name)
        assert [watcher.poll(), watcher.poll()] == [[], ["a", "b"]]       # no look raises; both are tried
        assert loader.describe("b").version == 2 and loader.describe("b").rank == 8
        assert loader.describe("a").version == 1                        # the loaded version stays
        assert watcher.poll() == []                                       # refused until it changes
    finally:
        watcher.stop()



def test_bad_adapters_through_the_server(tiny_model_dir, adapter_dir, tmp_path, stub_for):  # noqa: F811
    """Over gRPC, with the server's reader processes: each broken adapter is FAILED_PRECONDITION naming it,
    and a good adapter beside them is served."""
    from loraplex.v1 import generation_pb2 as pb
    from servers import ServerThread

    root = tmp_path / "root"
    for adapter_id in ("good", "loop-file", "fifo", "huge", "outside"):
        shutil.copytree(adapter_dir, root / adapter_id)
    os.symlink("loop-dir", root / "loop-dir")
    break_loop_file(root, "loop-file")
    os.unlink(root / "fifo" / WEIGHTS)
    os.mkfifo(root / "fifo" / WEIGHTS)
    break_huge(root, "huge")
    shutil.move(root / "outside" / CONFIG, tmp_path / CONFIG)         # a valid config, but out of the root
    os.symlink(tmp_path / CONFIG, root / "outside" / CONFIG)
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=8, adapter_roots=str(root),
                          adapter_slots=2, max_lora_rank=64)
    try:
        stub = stub_for(server.target)
        ask = lambda adapter_id: stub.Generate(pb.GenerateRequest(  # noqa: E731
            text="Hello", adapter_id=adapter_id, params=pb.Parameters(stopping=pb.StoppingCriteria(
                max_new_tokens=2))), timeout=300)
        for adapter_id in ("loop-dir", "loop-file", "fifo", "huge", "outside"):
            with pytest.raises(grpc.RpcError) as info:
                ask(adapter_id)
            details = info.value.details()
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (adapter_id, details)
            assert f"'{adapter_id}'" in details and str(tmp_path) not in details, details
        assert ask("good").generated_token_count == 2
    finally:
        server.close()
