"""Metrics as an operator sees them: a real Prometheus server scrapes loraplex during a mixed workload, and
what its HTTP API answers must match what the workload did, as counted by the client (requests, tokens,
failures by reason, adapters). `promtool check metrics` must find nothing wrong with the exposition."""

import pathlib
import re
import subprocess
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from loraplex.clients.admin import AdapterAdmin
from loraplex.clients.errors import NotFound
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc
from prometheus import Prometheus, binary
from servers import ServerThread, save_foreign_adapter

NEW = 5          # tokens per finished request (min = max, so each gives exactly NEW)
LONG = 400       # tokens asked by the requests that are cut off
PROMPT = "The weather today is"
DOCS = pathlib.Path(__file__).parent.parent / "docs"


def request(adapter_id="", new=NEW, **sampling):
    return pb.GenerateRequest(text=PROMPT, adapter_id=adapter_id, params=pb.Parameters(
        sampling=pb.SamplingParameters(**sampling),
        stopping=pb.StoppingCriteria(max_new_tokens=new, min_new_tokens=min(new, NEW))))


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(("alpha", "beta")):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.save_pretrained(root / name)
    save_foreign_adapter(root / "foreign", tmp_path_factory.mktemp("other-base"))
    return root


class Workload:
    """Runs the calls and keeps the client's own count of what happened."""

    def __init__(self, stub):
        self.stub = stub
        self.codes: list[grpc.StatusCode] = []
        self.finished = []              # responses of finished requests
        self.cut = []                   # (status, tokens the client received, prompt tokens) of cut-off streams

    def generate(self, req):
        try:
            self.finished.append(self.stub.Generate(req, timeout=60))
            self.codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            self.codes.append(exc.code())

    def cut_stream(self, req, *, timeout=None, cancel_after=None):
        stream = self.stub.GenerateStream(req, timeout=timeout)
        received, prompt = 0, 0
        try:
            for i, msg in enumerate(stream):
                received, prompt = msg.generated_token_count, msg.input_token_count or prompt
                if cancel_after is not None and i + 1 >= cancel_after:
                    stream.cancel()
        except grpc.RpcError as exc:
            self.codes.append(exc.code())
            self.cut.append((exc.code(), received, prompt))


@pytest.fixture(scope="module")
def scraped(tmp_path_factory, tiny_model_dir, root):
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=8, adapter_roots=str(root),
                          adapter_slots=4, metrics_top_adapters=1)
    prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{server.running.metrics_port}",
                            rule_files=(DOCS / "prometheus" / "alerts.yml",))
    channel = grpc.insecure_channel(server.target)
    work = Workload(pb_grpc.GenerationServiceStub(channel))
    try:
        prometheus.wait_for_scrape_after(time.time())       # a sample from before the workload, for rate()
        base = [threading.Thread(target=work.generate, args=(request(),)) for _ in range(4)]
        for t in base:
            t.start()
        for adapter_id in ("alpha", "alpha", "beta", "alpha"):
            if adapter_id == "beta":       # beta's request runs on its merged copy; a merge that fails first
                admin = AdapterAdmin(server.target)
                with pytest.raises(NotFound):
                    admin.merge("nope", "dense")
                admin.merge("beta", "dense")
            work.generate(request(adapter_id))
        for t in base:
            t.join()
        work.generate(pb.GenerateRequest(text=""))                     # validation
        work.generate(request(top_p=2.0))                               # validation
        work.generate(request("nope"))                                  # adapter not found
        work.generate(request("foreign"))                               # adapter that cannot be served
        work.cut_stream(request(new=LONG), timeout=0.3)                 # deadline
        work.cut_stream(request(new=LONG), cancel_after=3)              # cancelled by the client
        deadline = time.monotonic() + 30
        while not server.engine.idle() and time.monotonic() < deadline:  # the server has seen every ending
            time.sleep(0.05)
        time.sleep(0.2)
        prometheus.wait_for_scrape_after(time.time())
        with urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/metrics") as r:
            exposition = r.read()
        yield prometheus, work, exposition
    finally:
        channel.close()
        prometheus.close()
        server.close()


def test_prometheus_scrapes_the_endpoint(scraped):
    prometheus, _, _ = scraped
    assert prometheus.scalar('up{job="loraplex"}') == 1


def test_request_outcomes_match_what_clients_saw(scraped):
    prometheus, work, _ = scraped
    Code = grpc.StatusCode
    assert work.codes.count(Code.OK) == 8
    success = prometheus.query("loraplex_request_success_total")
    assert success[(("instance", _instance(prometheus)), ("job", "loraplex"), ("stop_reason", "MAX_TOKENS"))] == 8
    assert sum(success.values()) == 8
    failures = {dict(k)["reason"]: v for k, v in prometheus.query("loraplex_request_failure_total").items()}
    expected = {"validation": work.codes.count(Code.INVALID_ARGUMENT),
                "adapter_not_found": work.codes.count(Code.NOT_FOUND),
                "adapter_load": work.codes.count(Code.FAILED_PRECONDITION),
                "deadline": work.codes.count(Code.DEADLINE_EXCEEDED),
                "cancelled": work.codes.count(Code.CANCELLED)}
    assert expected == {"validation": 2, "adapter_not_found": 1, "adapter_load": 1, "deadline": 1, "cancelled": 1}
    assert failures == {**{reason: 0 for reason in failures}, **expected}
    assert prometheus.scalar("loraplex_request_duration_seconds_count") == 8


def test_token_counters_match_the_responses(scraped):
    prometheus, work, _ = scraped
    finished_tokens = sum(r.generated_token_count for r in work.finished)
    assert finished_tokens == 8 * NEW
    prompt_tokens = sum(r.input_token_count for r in work.finished) + sum(p for _, _, p in work.cut)
    assert all(p > 0 for _, _, p in work.cut)
    assert prometheus.scalar("loraplex_prompt_tokens_total") == prompt_tokens
    generated = prometheus.scalar("loraplex_generation_tokens_total")
    # the cut-off streams generated at least what their clients received, and at most what they asked for
    assert finished_tokens + sum(n for _, n, _ in work.cut) <= generated <= finished_tokens + LONG * len(work.cut)
    started = len(work.finished) + len(work.cut)        # requests that got a first token
    assert prometheus.scalar("loraplex_time_to_first_token_seconds_count") == started
    assert prometheus.scalar("loraplex_request_queue_duration_seconds_count") == started
    assert prometheus.scalar("loraplex_inter_token_latency_seconds_count") == generated - started


def test_adapter_metrics(scraped):
    prometheus, _, _ = scraped
    loads = {dict(k)["result"]: v for k, v in prometheus.query("loraplex_adapter_loads_total").items()}
    assert loads == {"ok": 2, "invalid": 1, "error": 0}        # alpha and beta read once each; foreign refused
    # top 1: alpha (3 requests) has its own series; beta and foreign are summed as "other"
    per_adapter = {dict(k)["adapter"]: v for k, v in prometheus.query("loraplex_adapter_requests_total").items()}
    assert per_adapter == {"alpha": 3, "other": 2}
    tiers = {dict(k)["tier"]: v for k, v in prometheus.query("loraplex_adapters_resident").items()}
    assert tiers == {"host": 2, "device": 2}
    assert prometheus.scalar("loraplex_adapter_slots") == 4
    assert prometheus.scalar("loraplex_adapter_slots_used") == 2
    assert prometheus.scalar("loraplex_adapter_slots_busy") == 0
    assert prometheus.scalar("loraplex_adapter_load_duration_seconds_count{stage=\"read\"}") == 2
    assert prometheus.scalar("loraplex_adapter_load_duration_seconds_count{stage=\"copy\"}") == 2
    assert sum(prometheus.query("loraplex_adapter_evictions_total").values()) == 0
    # one adapter request at a time beside base-only ones: every step counted, none with two adapters
    for phase in ("prefill", "decode"):
        steps = prometheus.scalar(f'loraplex_batch_size_count{{phase="{phase}"}}')
        assert prometheus.scalar(f'loraplex_step_adapters_count{{phase="{phase}"}}') == steps
        assert 0 < prometheus.scalar(f'loraplex_step_adapters_sum{{phase="{phase}"}}') <= steps
    assert prometheus.scalar('loraplex_step_adapters_bucket{phase="decode",le="1.0"}') == steps


def test_merge_metrics(scraped):
    """beta was merged (dense) after a merge of a missing adapter failed, and is still merged; its one
    request ran alone on the merged copy: a prefill and NEW - 1 decode steps."""
    prometheus, _, _ = scraped
    merges = {(dict(k)["operation"], dict(k)["method"], dict(k)["result"]): v
              for k, v in prometheus.query("loraplex_adapter_merges_total").items()}
    assert merges == {("merge", "dense", "ok"): 1, ("merge", "dense", "error"): 1}
    assert prometheus.scalar('loraplex_adapter_merge_duration_seconds_count{method="dense"}') == 1
    assert prometheus.scalar("loraplex_merged_adapters") == 1
    assert prometheus.scalar("loraplex_merged_memory_bytes") > 0
    assert abs(prometheus.scalar("loraplex_merged_retained_ratio") - 1) < 1e-3
    steps = {dict(k)["weights"]: v for k, v in prometheus.query("loraplex_steps_total").items()}
    assert steps["merged"] == NEW and steps["base"] > 0


def test_gauges_at_rest(scraped):
    prometheus, _, _ = scraped
    assert prometheus.scalar("loraplex_requests_running") == 0
    assert prometheus.scalar("loraplex_requests_waiting") == 0
    assert prometheus.scalar("loraplex_kv_cache_usage_ratio") == 0
    assert prometheus.scalar("loraplex_model_info") == 1


def test_histograms_have_no_adapter_label(scraped):
    prometheus, _, _ = scraped
    labels = prometheus.api("labels", **{"match[]": '{__name__=~"loraplex_.*_bucket"}'})
    assert "adapter" not in labels and "le" in labels


def test_promtool_finds_no_problem(scraped):
    _, _, exposition = scraped
    result = subprocess.run([binary("promtool"), "check", "metrics"], input=exposition, capture_output=True)
    assert result.returncode == 0 and result.stdout == b"" and result.stderr == b"", result


def _instance(prometheus) -> str:
    return prometheus.api("targets")["activeTargets"][0]["labels"]["instance"]


def test_documented_alert_rules_load_and_evaluate(scraped):
    prometheus, _, _ = scraped
    rules = prometheus.rules()
    assert len(rules) == 9
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    firing = [r["name"] for r in rules if r.get("state") == "firing"]
    assert firing == ["LoraplexAdapterLoadFailures"]   # the workload asked for an adapter that cannot be served


def test_documented_scrape_config_and_rules_pass_promtool():
    result = subprocess.run([binary("promtool"), "check", "config", str(DOCS / "prometheus" / "prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def panel_queries() -> list[str]:
    """The PromQL of docs/operations.md's panel table (third column, each query in backticks)."""
    doc = (DOCS / "operations.md").read_text()
    table = doc.split("### Dashboard panels", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    return [q for row in rows for q in re.findall(r"`([^`]+)`", row.split(" | ")[2])]


def test_documented_dashboard_queries_return_data(scraped):
    prometheus, _, _ = scraped
    queries = panel_queries()
    assert len(queries) >= 20
    empty = [q for q in queries if not prometheus.query(q)]
    assert empty == []
