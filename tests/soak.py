"""A soak: mixed traffic against one server for a while, then the checks.

Clients send greedy and seeded requests (base and adapters, more adapters than slots, so slots churn),
stop sequences, streams they cancel, calls whose deadline passes, bad requests and unknown adapters, while
an admin thread lists, unloads and reloads adapters and publishes new versions of one of them, sometimes
with a half-written weights file first, and merges that one into the weights and unmerges it (each method;
its new versions are merged again as they come). Checked at the end: no INTERNAL or UNKNOWN (or any status a call
could not have earned), every answer well-formed, repeated greedy and seeded requests identical, the
process's RSS bounded, the server's counters equal to what the clients saw, and its gauges back to 0.

    python tests/soak.py --seconds 600          # make soak
"""

import argparse
import collections
import itertools
import json
import logging
import pathlib
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.request

import grpc

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc, generation_pb2 as pb, generation_pb2_grpc  # noqa: E402
from servers import ServerThread, make_tiny_model  # noqa: E402

STABLE = [f"a{i}" for i in range(5)]      # never change: their answers must repeat
CHURN = "churn"                            # new versions published during the soak
PROMPTS = ["The weather today is", "Once upon a time", "My favourite colour", "Numbers: 1, 2, 3,"]
RSS_GROWTH_LIMIT_MB = 400
Code = grpc.StatusCode


def make_adapters(base_dir: pathlib.Path, root: pathlib.Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for i, name in enumerate(STABLE + [CHURN, f"{CHURN}-next"]):
        torch.manual_seed(100 + i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(
            r=4 + 4 * (i % 3), lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False))
        for p in model.parameters():
            if p.requires_grad:
                p.data *= 10
        model.save_pretrained(root / name)


class Tally:
    """What the clients saw: status counts, answers by request, problems found."""

    def __init__(self):
        self.lock = threading.Lock()
        self.codes = collections.Counter()
        self.answers: dict[tuple, tuple] = {}
        self.problems: list[str] = []
        self.timed_out: set[str] = set()      # request ids of the deadline calls that ended DEADLINE_EXCEEDED

    def saw(self, code: Code, allowed: set) -> None:
        with self.lock:
            self.codes[code.name] += 1
            if code not in allowed:
                self.problems.append(f"status {code.name} where only {sorted(c.name for c in allowed)} may come")

    def same_answer(self, key: tuple, answer: tuple) -> None:
        with self.lock:
            first = self.answers.setdefault(key, answer)
            if first != answer:
                self.problems.append(f"{key} answered {answer} after {first}")

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


def request(rng: random.Random, adapter: str, sampled: bool, stops: bool, new: int = 12) -> pb.GenerateRequest:
    sampling = pb.SamplingParameters(temperature=0.9, top_p=0.95, seed=rng.randrange(4)) if sampled else None
    stopping = pb.StoppingCriteria(max_new_tokens=new, min_new_tokens=rng.choice([0, 3]),
                                   stop_sequences=[" the", "."] if stops else [])
    return pb.GenerateRequest(text=rng.choice(PROMPTS), adapter_id=adapter, params=pb.Parameters(
        sampling=sampling, stopping=stopping, response=pb.ResponseOptions(token_logprobs=True)))


def well_formed(tally: Tally, req: pb.GenerateRequest, res: pb.GenerateResponse) -> None:
    stopping = req.params.stopping
    if res.generated_token_count != len(res.tokens) or not 0 < res.generated_token_count <= stopping.max_new_tokens:
        tally.problem(f"{res.generated_token_count} tokens counted, {len(res.tokens)} sent")
    if res.stop_reason == pb.STOP_SEQUENCE and res.stop_sequence not in stopping.stop_sequences:
        tally.problem(f"stopped on {res.stop_sequence!r}, not one of the request's")
    if res.stop_reason not in (pb.MAX_TOKENS, pb.EOS_TOKEN, pb.STOP_SEQUENCE):
        tally.problem(f"stop reason {pb.StopReason.Name(res.stop_reason)}")


def client(target: str, tally: Tally, seed: int, until: float) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        while time.monotonic() < until:
            action = rng.choices(["answer", "churn", "cancel", "deadline", "bad", "unknown"],
                                 [10, 2, 1, 1, 1, 1])[0]
            ACTIONS[action](stub, rng, tally)


def do_answer(stub, rng, tally):
    adapter, sampled = rng.choice(["", *STABLE]), rng.random() < 0.4
    req = request(rng, adapter, sampled, stops=rng.random() < 0.3)
    res = _call(stub.Generate, req, tally, {Code.OK, Code.RESOURCE_EXHAUSTED})
    if res is not None:
        well_formed(tally, req, res)
        tally.same_answer((req.SerializeToString(deterministic=True),), (res.text, tuple(t.token_id for t in res.tokens)))


def do_churn(stub, rng, tally):
    # the admin thread may be publishing a half-written version: FAILED_PRECONDITION then, never more
    req = request(rng, CHURN, sampled=False, stops=False)
    res = _call(stub.Generate, req, tally, {Code.OK, Code.RESOURCE_EXHAUSTED, Code.FAILED_PRECONDITION})
    if res is not None:
        well_formed(tally, req, res)


def do_cancel(stub, rng, tally):
    stream = stub.GenerateStream(request(rng, rng.choice(["", *STABLE]), False, False, new=200), timeout=60)
    try:
        next(stream)
        stream.cancel()
        for _ in stream:
            pass
    except grpc.RpcError as exc:
        tally.saw(exc.code(), {Code.CANCELLED, Code.RESOURCE_EXHAUSTED})


_DEADLINE_IDS = itertools.count()


def do_deadline(stub, rng, tally):
    req = request(rng, rng.choice(["", *STABLE]), False, False, new=400)
    req.request_id = f"deadline-{next(_DEADLINE_IDS)}"
    try:
        stub.Generate(req, timeout=0.3)
        tally.saw(Code.OK, {Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED})
    except grpc.RpcError as exc:
        tally.saw(exc.code(), {Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED})
        if exc.code() == Code.DEADLINE_EXCEEDED:
            with tally.lock:
                tally.timed_out.add(req.request_id)


class RequestLines(logging.Handler):
    """The request ids of the server's per-request log lines (`loraplex.requests`): the calls it saw."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.ids: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.ids.add(json.loads(record.getMessage())["request_id"])


def do_bad(stub, rng, tally):
    bad = rng.choice([dict(temperature=1e-40), dict(top_p=1.5), dict(repetition_penalty=1e-45)])
    req = pb.GenerateRequest(text="Hello", params=pb.Parameters(sampling=pb.SamplingParameters(**bad)))
    _call(stub.Generate, req, tally, {Code.INVALID_ARGUMENT})


def do_unknown(stub, rng, tally):
    _call(stub.Generate, pb.GenerateRequest(text="Hello", adapter_id=f"missing-{rng.randrange(3)}"), tally,
          {Code.NOT_FOUND})


ACTIONS = {"answer": do_answer, "churn": do_churn, "cancel": do_cancel, "deadline": do_deadline, "bad": do_bad,
           "unknown": do_unknown}


def _call(method, req, tally: Tally, allowed: set, timeout: float = 120):
    try:
        res = method(req, timeout=timeout)
    except grpc.RpcError as exc:
        tally.saw(exc.code(), allowed - {Code.OK})
        return None
    tally.saw(Code.OK, allowed)
    return res


def admin_loop(target: str, root: pathlib.Path, tally: Tally, seed: int, until: float) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(target) as channel:
        admin = adapters_pb2_grpc.AdapterServiceStub(channel)
        while time.monotonic() < until:
            choice = rng.choice(["list", "unload", "load", "publish", "merge", "unmerge"])
            try:
                if choice == "list":
                    admin.ListAdapters(apb.ListAdaptersRequest(), timeout=30)
                elif choice == "unload":
                    admin.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=rng.choice(STABLE)), timeout=30)
                elif choice == "load":
                    admin.LoadAdapter(apb.LoadAdapterRequest(adapter_id=rng.choice(STABLE)), timeout=60)
                elif choice == "merge":       # CHURN only: the answers of STABLE adapters must repeat exactly
                    admin.MergeAdapter(apb.MergeAdapterRequest(adapter_id=CHURN, method=rng.choice(
                        [apb.DENSE, apb.REQUANTIZE])), timeout=60)
                elif choice == "unmerge":
                    admin.UnmergeAdapter(apb.UnmergeAdapterRequest(), timeout=30)
                else:
                    publish(admin, root, rng)
            except grpc.RpcError as exc:     # unloading what is not loaded, a half-written version, nothing merged
                if exc.code() not in (Code.NOT_FOUND, Code.FAILED_PRECONDITION):
                    tally.problem(f"admin {choice}: {exc.code().name} {exc.details()}")
            time.sleep(rng.uniform(0.2, 0.8))


def publish(admin, root: pathlib.Path, rng: random.Random) -> None:
    """A new version of CHURN: its weights swapped with the other set, sometimes half-written first."""
    weights, spare = root / CHURN / "adapter_model.safetensors", root / f"{CHURN}-next" / "adapter_model.safetensors"
    data, other = weights.read_bytes(), spare.read_bytes()
    if rng.random() < 0.4:
        weights.write_bytes(other[: len(other) // 2])
        try:
            admin.LoadAdapter(apb.LoadAdapterRequest(adapter_id=CHURN), timeout=60)
        finally:
            weights.write_bytes(other)
            spare.write_bytes(data)
    else:
        weights.write_bytes(other)
        spare.write_bytes(data)
    admin.LoadAdapter(apb.LoadAdapterRequest(adapter_id=CHURN), timeout=60)


def rss_mb() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = collections.Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = (sample.labels.get("reason") or sample.labels.get("stop_reason") or sample.labels.get("weights")
                     or "")
            values[f"{sample.name}{{{label}}}" if label else sample.name] += sample.value
    return values


def check_metrics(tally: Tally, values: dict[str, float], unseen: int) -> None:
    """unseen: calls whose deadline passed before the server saw them (no request log line): the client
    counts them, the server cannot."""
    seen = tally.codes
    want = {"loraplex_request_failure_total{validation}": seen["INVALID_ARGUMENT"],
            "loraplex_request_failure_total{adapter_not_found}": seen["NOT_FOUND"],
            "loraplex_request_failure_total{cancelled}": seen["CANCELLED"],
            "loraplex_request_failure_total{deadline}": seen["DEADLINE_EXCEEDED"] - unseen,
            "loraplex_request_failure_total{internal}": 0}
    ok = sum(v for k, v in values.items() if k.startswith("loraplex_request_success_total"))
    if ok != seen["OK"]:
        tally.problem(f"metrics count {ok} successes, clients saw {seen['OK']}")
    for name, count in want.items():
        if values.get(name, 0) != count:
            tally.problem(f"{name} is {values.get(name, 0)}, clients saw {count}")
    for gauge in ("loraplex_requests_running", "loraplex_requests_waiting", "loraplex_adapter_slots_busy"):
        if values.get(gauge, 0) != 0:
            tally.problem(f"{gauge} is {values[gauge]} after the soak")


def soak(seconds: float, clients: int = 8, seed: int = 0) -> dict:
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="loraplex-soak-"))
    try:
        base, root = make_tiny_model(scratch / "base"), scratch / "adapters"
        make_adapters(base, root)
        server = ServerThread(model=str(base), kv_cache_mb=4, max_batch_size=8, max_queue_size=64,
                              adapter_roots=str(root), adapter_slots=3, max_lora_rank=16)
        try:
            return _drive(server, root, seconds, clients, seed)
        finally:
            server.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _drive(server: ServerThread, root: pathlib.Path, seconds: float, clients: int, seed: int) -> dict:
    tally, start_rss, lines = Tally(), rss_mb(), RequestLines()
    request_log = logging.getLogger("loraplex.requests")
    request_log.addHandler(lines)
    request_log.setLevel(logging.INFO)
    try:
        return _run_clients(server, root, seconds, clients, seed, tally, start_rss, lines)
    finally:
        request_log.removeHandler(lines)


def _run_clients(server, root, seconds, clients, seed, tally: Tally, start_rss: float, lines: RequestLines) -> dict:
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=client, args=(server.target, tally, seed + i, until)) for i in range(clients)]
    threads.append(threading.Thread(target=admin_loop, args=(server.target, root, tally, seed, until)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 300)
    deadline = time.monotonic() + 30
    while not server.engine.idle() and time.monotonic() < deadline:   # cancelled work drains away
        time.sleep(0.1)
    time.sleep(0.5)
    unseen = len(tally.timed_out - lines.ids)
    values = scrape(server.running.metrics_port)
    check_metrics(tally, values, unseen)
    growth = rss_mb() - start_rss
    if growth > RSS_GROWTH_LIMIT_MB:
        tally.problem(f"RSS grew by {growth:.0f} MB")
    return {"seconds": seconds, "calls": dict(tally.codes), "deadline_before_the_server_saw_it": unseen,
            "repeated_requests": len(tally.answers), "merges_and_unmerges": values["loraplex_adapter_merges_total"],
            "merged_steps": values["loraplex_steps_total{merged}"],
            "rss_growth_mb": round(growth), "problems": tally.problems[:20]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--clients", type=int, default=12)
    args = parser.parse_args()
    report = soak(args.seconds, args.clients)
    print(json.dumps(report, indent=2))
    sys.exit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()
