"""One JSON log line per request, with its numbers and how it ended, and no prompt text unless asked."""

import json
import logging

import grpc
import pytest

from loraplex.v1 import generation_pb2 as pb
from servers import ServerThread

MARKER = "zebra-marker-4711"


def lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "loraplex.requests"]


@pytest.mark.parametrize("log_prompts", [False, True])
def test_one_json_line_per_request(tiny_model_dir, stub_for, caplog, log_prompts):
    caplog.set_level(logging.INFO, logger="loraplex.requests")
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, log_prompts=log_prompts)
    try:
        stub = stub_for(server.target)
        ok = stub.Generate(pb.GenerateRequest(text=f"Say {MARKER}", request_id="r-ok", params=pb.Parameters(
            stopping=pb.StoppingCriteria(max_new_tokens=3, min_new_tokens=3))), timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.Generate(pb.GenerateRequest(text="Hi", request_id="r-bad", adapter_id="nope"), timeout=30)
    finally:
        server.close()
    by_id = {line["request_id"]: line for line in lines(caplog)}
    good = by_id["r-ok"]
    assert good["ended"] == "MAX_TOKENS" and good["output_tokens"] == 3
    assert good["input_tokens"] == ok.input_token_count and 0 < good["ttft_s"] <= good["total_s"]
    assert by_id["r-bad"]["ended"] == "NOT_FOUND" and by_id["r-bad"]["adapter"] == "nope"
    logged = json.dumps(list(by_id.values()))
    assert (MARKER in logged) == log_prompts
