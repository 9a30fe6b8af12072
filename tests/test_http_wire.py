"""The HTTP API on the wire: `curl -N` streams server-sent events ending with `data: [DONE]`; a client that
disconnects, mid-stream or while waiting for a whole answer, ends its request at once (its KV blocks freed,
read from the engine); a full queue is 429 and a draining server 503, as the `openai` client sees them;
the request log and the metrics count HTTP requests as they count gRPC ones."""

import asyncio
import json
import logging
import socket
import subprocess
import threading
import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from http_server import base_url, http_server
from loraplex.server.main import shutdown

LONG = {"max_tokens": 400, "min_tokens": 400}     # the tiny model takes seconds for these


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    server = http_server(tiny_model_dir)
    yield server
    server.close()


def body(server, **fields) -> str:
    return json.dumps({"model": server.running.model.name, "prompt": "Hello", "temperature": 0, **fields})


def curl(server, path, data=None, *args) -> subprocess.Popen:
    command = ["curl", "-sN", *args, base_url(server) + path]
    if data is not None:
        command += ["-H", "Content-Type: application/json", "-d", data]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def metrics(server) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=10).read()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text.decode())
            for s in f.samples}


def test_curl_streams_server_sent_events_ending_with_done(server):
    proc = curl(server, "/v1/chat/completions", json.dumps({
        "model": server.running.model.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
        "min_tokens": 6, "temperature": 0, "stream": True}), "-i")
    out, _ = proc.communicate(timeout=60)
    head, _, events = out.partition("\n\n")     # text mode: curl's CRLF arrive as \n
    assert head.startswith("HTTP/1.1 200") and "content-type: text/event-stream" in head.lower()
    lines = [line for line in events.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_kv_blocks_at_once(server, stream, caplog):
    engine = server.engine
    proc = curl(server, "/v1/completions", body(server, stream=stream, **LONG), "-H", "X-Request-Id: leaving")
    with caplog.at_level(logging.INFO, logger="loraplex.requests"):
        if stream:
            assert proc.stdout.readline().startswith("data: ")       # it is streaming
        wait_for(lambda: engine.stats().running == 1 and engine.stats().kv_usage > 0)
        time.sleep(0.2)
        proc.kill()
        proc.wait()
        left = time.monotonic()
        wait_for(lambda: engine.idle() and engine.stats().kv_usage == 0, timeout=10)
        freed_after = time.monotonic() - left
        wait_for(lambda: any('"leaving"' in r.getMessage() for r in caplog.records), timeout=5)
    line = json.loads(next(r.getMessage() for r in caplog.records if '"leaving"' in r.getMessage()))
    assert line["ended"] == "CANCELLED" and 0 < line["output_tokens"] < LONG["max_tokens"], line
    assert freed_after < 1.0, freed_after         # a step or two (measured: 20 ms), not the rest of 400 tokens


def test_errors_have_openais_shape_and_the_http_status(server, tmp_path):
    def call(path, data=None, method=None, headers=None):
        req = urllib.request.Request(base_url(server) + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, error = call("/v1/completions", b"{not json")
    assert status == 400 and error["error"]["param"] == "body" and error["error"]["type"] == "invalid_request_error"
    assert call("/v1/completions", b"[1, 2]")[0] == 400
    big = tmp_path / "big.json"     # refused on its Content-Length: curl stops sending and reads the answer
    big.write_text(body(server, prompt="x" * (server.config.max_message_bytes + 1)))
    proc = curl(server, "/v1/completions", "@" + str(big), "-w", "\n%{http_code}")
    out, _ = proc.communicate(timeout=60)
    error, status = out.rsplit("\n", 1)
    assert status == "413" and "--max-message-bytes" in json.loads(error)["error"]["message"]
    assert call("/v1/nothing-here")[0] == 404 and call("/v1/completions", method="GET")[0] == 405
    assert call("/health") == (200, {"status": "SERVING"})


def test_the_request_log_and_metrics_count_http_requests(server, caplog):
    before = metrics(server)
    client = openai.OpenAI(base_url=base_url(server) + "/v1", api_key="x", max_retries=0)
    with caplog.at_level(logging.INFO, logger="loraplex.requests"):
        answer = client.completions.create(model=server.running.model.name, prompt="Hi", max_tokens=3,
                                           extra_body={"min_tokens": 3}, extra_headers={"X-Request-Id": "http-1"})
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=server.running.model.name, prompt="Hi", temperature=-2)
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "loraplex.requests"]
    assert answer.id == "cmpl-http-1"
    assert {"request_id": "http-1", "adapter": None, "input_tokens": answer.usage.prompt_tokens, "output_tokens": 3,
            "ended": "MAX_TOKENS"}.items() <= logged[0].items()
    assert logged[1]["ended"] == "INVALID_ARGUMENT"
    after = metrics(server)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)
    assert grew("loraplex_request_success_total", stop_reason="MAX_TOKENS") == 1
    assert grew("loraplex_request_failure_total", reason="validation") == 1
    assert grew("loraplex_http_responses_total", route="/v1/completions", code="200") == 1
    assert grew("loraplex_http_responses_total", route="/v1/completions", code="400") == 1


def test_a_full_queue_is_429_and_a_draining_server_503(tiny_model_dir):
    server = http_server(tiny_model_dir, max_batch_size=1, max_queue_size=1)
    client = openai.OpenAI(base_url=base_url(server) + "/v1", api_key="x", max_retries=0, timeout=120)
    name, results = server.running.model.name, {}
    try:
        def run(key, **fields):
            results[key] = client.completions.create(model=name, prompt="Hello", temperature=0, extra_body={
                "min_tokens": fields["max_tokens"]}, max_tokens=fields["max_tokens"])
        running = threading.Thread(target=run, args=("running",), kwargs=LONG)
        running.start()
        wait_for(lambda: server.engine.stats().running == 1)
        queued = threading.Thread(target=run, args=("queued",), kwargs={"max_tokens": 4})
        queued.start()
        wait_for(lambda: server.engine.stats().waiting == 1)
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model=name, prompt="Hello", max_tokens=2)
        assert caught.value.status_code == 429 and "queue is full" in caught.value.body["message"]
        drained = asyncio.run_coroutine_threadsafe(shutdown(server.running, grace=60), server.loop)
        wait_for(lambda: not server.running.health.serving)
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(model=name, prompt="Hello", max_tokens=2)
        assert caught.value.status_code == 503
        health = urllib.request.Request(base_url(server) + "/health")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(health, timeout=10)
        assert refused.value.code == 503
        running.join(120)
        queued.join(120)
        drained.result(120)
    finally:
        server.loop.call_soon_threadsafe(server.loop.stop)
    assert results["running"].usage.completion_tokens == LONG["max_tokens"]     # the drain let both finish
    assert results["queued"].choices[0].finish_reason == "length"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.running.http.port), timeout=5).close()
