import os
import pathlib
import sys

# Triton kernels run in Triton's interpreter on the CPU (tests/test_triton_ops.py). The switch is read when
# triton is first imported, and other libraries may import it before that test module loads: set it first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from servers import ServerThread, embedded_model_dir, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def embedded_dir() -> pathlib.Path:
    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> pathlib.Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_server_thread(tiny_model_dir):
    """A server on a tiny random Llama, in this process (its engine can be inspected)."""
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=8, max_queue_size=16)
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_server(tiny_server_thread) -> str:
    """Target "127.0.0.1:PORT" of the tiny-model server."""
    return tiny_server_thread.target


@pytest.fixture(scope="session")
def embedded_server_thread():
    """A server on the embedded SmolLM2-135M-Instruct, in this process."""
    server = ServerThread(max_batch_size=8, kv_cache_mb=128)
    yield server
    server.close()


@pytest.fixture()
def stub_for():
    """Makes a raw GenerationService stub for a target; channels are closed after the test."""
    import grpc
    from loraplex.v1 import generation_pb2_grpc

    channels = []

    def make(target):
        channel = grpc.insecure_channel(target)
        channels.append(channel)
        return generation_pb2_grpc.GenerationServiceStub(channel)

    yield make
    for channel in channels:
        channel.close()
