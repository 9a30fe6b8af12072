"""An independent client: Node.js with @grpc/grpc-js, loading only protos/ (tests/node/interop.js),
against a real server. Its answers must equal what the server's own Python stack gives."""

import json
import pathlib
import shutil
import subprocess

import grpc

from loraplex.v1 import generation_pb2 as pb

NODE_DIR = pathlib.Path(__file__).parent / "node"


def test_node_client_speaks_our_wire_format(tiny_server, stub_for):
    assert shutil.which("node"), "node is needed (the machine's Node.js; make install fetches the npm packages)"
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), "run `make install` (npm ci in tests/node)"
    run = subprocess.run(["node", str(NODE_DIR / "interop.js"), tiny_server], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)

    stub = stub_for(tiny_server)
    greedy = pb.GenerateRequest(text="The weather today is", params=pb.Parameters(
        stopping=pb.StoppingCriteria(max_new_tokens=8, min_new_tokens=8),
        response=pb.ResponseOptions(token_logprobs=True)))
    want = stub.Generate(greedy, timeout=60)
    assert got["health"] == "SERVING"
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert got["model"]["model_name"] == info.model_name and got["model"]["vocab_size"] == info.vocab_size
    tokens = stub.Tokenize(pb.TokenizeRequest(text="Hello world", return_tokens=True), timeout=30)
    assert got["tokenize"]["token_ids"] == list(tokens.token_ids) and got["tokenize"]["tokens"] == list(tokens.tokens)
    assert got["generate"]["token_ids"] == [t.token_id for t in want.tokens]
    assert got["generate"]["text"] == want.text and got["generate"]["generated_token_count"] == 8
    assert got["generate"]["stop_reason"] == "MAX_TOKENS"
    assert got["stream"]["token_ids"] == got["generate"]["token_ids"] and got["stream"]["text"] == want.text
    assert got["empty_prompt"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.name
