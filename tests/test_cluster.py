"""`loraplex serve --replicas 2`: the front on a local Ray cluster (loopback only, 1 CPU per replica, shut
down at the end) with 2 replicas of a tiny model, against a single server on the same model and adapters
(in this process, with the same torch threads per engine).

Rules: greedy answers are compared token for token (same model, same kernels, same thread count: exact);
statuses and messages of bad requests must equal the single server's. KV memory and running requests are
read from the front's /metrics (each replica's engine gauges, labelled by replica).
"""

import pathlib
import random
import shutil
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster_front import listening_sockets, ray_processes_of, replica_pids, wait_for
from prometheus import Prometheus, binary
from servers import ServerThread
from loraplex.bench.front_process import FrontProcess
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc as apb_grpc
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc

ZIPF = [f"z{i:02d}" for i in range(20)]      # the trace's adapters
SAME = ["s0", "s1", "s2"]                     # answers compared with the single server
SPARE = "spare"                               # loaded only by the admin test
REPLICAS = 2
OK, UNAVAILABLE = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def adapter_root(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("cluster-adapters")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    for i, name in enumerate([*ZIPF, *SAME, SPARE]):
        torch.manual_seed(1000 + i)
        for p in model.parameters():
            if p.requires_grad:
                p.data = torch.randn_like(p) * 0.5
        model.save_pretrained(root / name)
    return root


def flags(model, root):
    return dict(model=str(model), adapter_roots=str(root), kv_cache_mb=8, max_batch_size=8, adapter_slots=24,
                max_lora_rank=8, threads=1)


@pytest.fixture(scope="module")
def front(tiny_model_dir, adapter_root):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags(tiny_model_dir, adapter_root).items()]
    process = FrontProcess(f"--replicas={REPLICAS}", "--replica-cpus=1", "--shutdown-grace-seconds=30", *args)
    yield process
    process.kill()


@pytest.fixture(scope="module")
def single(tiny_model_dir, adapter_root):
    server = ServerThread(**flags(tiny_model_dir, adapter_root), metrics=False)
    yield server
    server.close()


@pytest.fixture(scope="module")
def stubs(front):
    with grpc.insecure_channel(front.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel), apb_grpc.AdapterServiceStub(channel), channel


def request(text, adapter="", new=8, **sampling):
    return pb.GenerateRequest(text=text, adapter_id=adapter, params=pb.Parameters(
        sampling=pb.SamplingParameters(**sampling), stopping=pb.StoppingCriteria(max_new_tokens=new)))


def answer(stub, req):
    res = stub.Generate(req, timeout=120)
    return res.generated_token_count, [t.token_id for t in res.tokens], res.text


def test_greedy_answers_equal_a_single_servers(stubs, single):
    gen, _, _ = stubs
    with grpc.insecure_channel(single.target) as channel:
        alone = pb_grpc.GenerationServiceStub(channel)
        for adapter in ["", *SAME]:
            for text in ("Hello there", "The capital of France is"):
                req = request(text, adapter, new=12)
                req.params.response.token_logprobs = True
                assert answer(gen, req) == answer(alone, req), (adapter, text)


def test_bad_requests_get_a_single_servers_status_and_message(stubs, single):
    gen, _, _ = stubs
    bad = [request("Hello", "missing-adapter"), request("Hello", top_p=1.5), request("Hello", temperature=-1),
           pb.GenerateRequest(text=""), request("Hello", new=5000), pb.GenerateRequest(text="hi", request_id="a\x00b")]
    with grpc.insecure_channel(single.target) as channel:
        alone = pb_grpc.GenerationServiceStub(channel)
        for req in bad:
            with pytest.raises(grpc.RpcError) as on_cluster:
                gen.Generate(req, timeout=60)
            with pytest.raises(grpc.RpcError) as on_single:
                alone.Generate(req, timeout=60)
            assert on_cluster.value.code() == on_single.value.code() != grpc.StatusCode.INTERNAL
            assert on_cluster.value.details() == on_single.value.details()


def test_the_front_serves_the_openai_api_as_a_single_server_does(front, single):
    """The official openai client against the front's HTTP API and a single server's: equal answers
    (whole and streamed), the same models, the same typed error."""
    import openai

    on_cluster, alone = (openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                                       timeout=120) for port in (front.http_port, single.running.http.port))
    assert {m.id for m in on_cluster.models.list()} == {m.id for m in alone.models.list()}
    base = single.running.model.name
    for model in (base, SAME[0]):
        asked = dict(model=model, prompt="Hello there", max_tokens=12, temperature=0)
        want, got = alone.completions.create(**asked), on_cluster.completions.create(**asked)
        assert (got.choices[0].text, got.usage) == (want.choices[0].text, want.usage)
        chat = dict(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in on_cluster.chat.completions.create(
            stream=True, **chat) if c.choices)
        assert streamed == alone.chat.completions.create(**chat).choices[0].message.content
    for client in (on_cluster, alone):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="missing-adapter", prompt="Hello", max_tokens=2)


def test_the_cluster_listens_on_loopback_only(front):
    sockets = listening_sockets([front.proc.pid, *ray_processes_of()])
    assert len(sockets) > 5                       # the front, gcs, raylet, agents and workers
    outside = [s for s in sockets if not s.rsplit(":", 1)[0] in ("127.0.0.1", "::1")]
    assert outside == [], sockets


def loads_ok(front) -> float:
    return sum(v for labels, v in front.samples("loraplex_adapter_loads_total").items() if ("result", "ok") in labels)


def test_zipf_trace_reads_each_adapter_about_once(stubs, front):
    """A Poisson trace (25 requests/s) whose adapters follow Zipf(1.1) over 20: Serve's multiplexed routing
    sends an adapter's requests where it is resident. Routing blind to residency would read an adapter with
    n requests on about R(1 - (1 - 1/R)^n) of the R replicas (1.78 reads per adapter for this trace); the
    rule asserted is that multiplexing saves at least half of those extra reads. A second replica reads an
    adapter only when its requests come within the time Serve takes to tell its routers of a new residency
    (~0.2 s idle, longer on a loaded machine)."""
    gen, _, _ = stubs
    rng = random.Random(7)
    weights = [1 / (k + 1) ** 1.1 for k in range(len(ZIPF))]
    trace = rng.choices(ZIPF, weights, k=160)
    before = loads_ok(front)
    calls = []
    for adapter in trace:
        calls.append(gen.Generate.future(request("Hello", adapter, new=3), timeout=120))
        time.sleep(rng.expovariate(25))
    assert [call.code() for call in calls] == [OK] * len(calls)
    loads = loads_ok(front) - before
    distinct = len(set(trace))
    blind = sum(REPLICAS * (1 - (1 - 1 / REPLICAS) ** trace.count(a)) for a in set(trace))
    print(f"zipf trace: {len(trace)} requests, {distinct} adapters, {loads:.0f} reads "
          f"({loads / distinct:.2f} per adapter, {blind / distinct:.2f} if routed blind); "
          f"{1 - loads / len(trace):.1%} found their adapter resident")
    assert loads <= (distinct + blind) / 2


def running(front) -> dict[str, float]:
    return {dict(labels)["replica"]: v for labels, v in front.samples("loraplex_requests_running").items()}


def kv_usage(front) -> float:
    return sum(front.samples("loraplex_kv_cache_usage_ratio").values())


def test_cancel_mid_stream_frees_the_replicas_kv(stubs, front):
    gen, _, _ = stubs
    stream = gen.GenerateStream(request("Tell me a story", "s1", new=400), timeout=120)
    next(stream)
    assert wait_for(lambda: sum(running(front).values()) == 1 and kv_usage(front) > 0, 10)
    stream.cancel()
    assert wait_for(lambda: sum(running(front).values()) == 0 and kv_usage(front) == 0, 5), running(front)


def test_deadline_travels_and_frees_the_replicas_kv(stubs, front):
    """A unary call (one replica call, not a stream) whose deadline passes mid-generation."""
    gen, _, _ = stubs
    with pytest.raises(grpc.RpcError) as info:
        gen.Generate(request("Tell me a story", "s2", new=1000), timeout=0.6)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: sum(running(front).values()) == 0 and kv_usage(front) == 0, 5), running(front)


def test_admin_reaches_every_replica_or_a_named_one(stubs, front, capsys):
    from loraplex.clients.cli import main

    _, admin, _ = stubs
    listed = {a.adapter_id: a for a in admin.ListAdapters(apb.ListAdaptersRequest(), timeout=60).adapters}
    replicas = sorted(r.replica_id for r in listed[SPARE].by_replica)
    assert len(replicas) == 2 and listed[SPARE].replicas == []
    one = admin.LoadAdapter(apb.LoadAdapterRequest(adapter_id=SPARE, replica=replicas[0]), timeout=60)
    assert list(one.replicas) == [replicas[0]] and one.state == apb.LOADED
    both = admin.LoadAdapter(apb.LoadAdapterRequest(adapter_id=SPARE, pin=True), timeout=60)
    assert sorted(both.replicas) == replicas and all(r.pinned for r in both.by_replica)
    assert sorted(admin.GetAdapter(apb.GetAdapterRequest(adapter_id=SPARE), timeout=60).replicas) == replicas
    gone = admin.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=SPARE), timeout=60)
    assert list(gone.replicas) == []
    capsys.readouterr()
    assert main(["adapters", "load", SPARE, "--replica", replicas[1], "--target", front.target]) == 0
    assert main(["adapters", "list", "--target", front.target]) == 0
    assert f"on {replicas[1]}" in [line for line in capsys.readouterr().out.splitlines() if line.startswith(SPARE)][0]
    with pytest.raises(grpc.RpcError) as info:
        admin.LoadAdapter(apb.LoadAdapterRequest(adapter_id=SPARE, replica="no-such-replica"), timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        admin.GetAdapter(apb.GetAdapterRequest(adapter_id="missing-adapter"), timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_metrics_have_each_replica_and_pass_promtool(front, tmp_path):
    exposition = front.exposition()
    checked = subprocess.run([binary("promtool"), "check", "metrics"], input=exposition.encode(),
                             capture_output=True)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    assert len(running(front)) == 2
    successes = front.samples("loraplex_request_success_total")
    assert successes and all("replica" not in dict(labels) for labels in successes)   # counted by the front
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{front.metrics_port}")
    try:
        series = wait_for(lambda: prometheus.query("sum by (replica) (loraplex_generation_tokens_total)"), 30)
        assert len(series) == 2 and all(value > 0 for value in series.values())
    finally:
        prometheus.close()


def test_a_killed_replica_fails_only_its_own_requests(stubs, front):
    gen, _, _ = stubs
    outcomes, started = [], threading.Barrier(9)

    def client():
        stream = gen.GenerateStream(request("Once upon a time", "", new=300), timeout=120)
        try:
            next(stream)
            started.wait(30)
            for _ in stream:
                pass
            outcomes.append(OK)
        except grpc.RpcError as exc:
            outcomes.append(exc.code())
            outcomes.append(exc.details()) if exc.code() != UNAVAILABLE else None

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    started.wait(60)
    victim = replica_pids()[0]
    subprocess.run(["kill", "-9", str(victim)], check=True)
    for t in threads:
        t.join(120)
    print(f"killed replica {victim}: {outcomes.count(UNAVAILABLE)} of 8 streams UNAVAILABLE, the rest OK")
    assert set(outcomes) <= {OK, UNAVAILABLE}, outcomes
    assert outcomes.count(UNAVAILABLE) >= 1 and outcomes.count(OK) >= 1, outcomes
    for _ in range(4):                                 # new requests go to the live replica meanwhile
        assert answer(gen, request("Hello", new=4))[0] == 4
    assert wait_for(lambda: len(replica_pids()) == 2 and victim not in replica_pids(), 90)   # Serve restarts it


def test_sigterm_drains_like_a_single_server(stubs, front):
    gen, _, channel = stubs
    health = health_pb2_grpc.HealthStub(channel)
    results = []

    def client():
        try:
            results.append(answer(gen, request("Once upon a time", "", new=150))[0])
        except grpc.RpcError as exc:
            results.append(exc.code())

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    assert wait_for(lambda: sum(running(front).values()) == 3, 20)
    front.proc.send_signal(15)
    assert wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING, 10)
    with pytest.raises(grpc.RpcError) as refused:
        gen.Generate(request("Hello"), timeout=30)
    assert refused.value.code() == UNAVAILABLE
    for t in threads:
        t.join(120)
    assert results == [150, 150, 150]
    assert front.proc.wait(90) == 0
    assert wait_for(lambda: not ray_processes_of(), 30), ray_processes_of()


def test_a_front_uses_replicas_deployed_from_the_documented_serve_config(tiny_model_dir, adapter_root, tmp_path):
    """An existing Ray cluster (`ray start --head`), the replicas deployed by `serve run` from
    docs/cluster/serve-config.yaml (its args pointed at the tiny model), and a front that finds them and
    leaves them running when it stops."""
    import os
    import tempfile

    import yaml

    config = yaml.safe_load((pathlib.Path(__file__).parents[1] / "docs/cluster/serve-config.yaml").read_text())
    config["applications"][0]["args"].update(replicas=1, **flags(tiny_model_dir, adapter_root))
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token"}      # `ray start` made a token (~/.ray/auth_token): its clients send it
    address = f"127.0.0.1:{_free_port()}"
    temp = tempfile.mkdtemp(prefix="loraplex-ray-")
    bin_dir = pathlib.Path(sys.executable).parent
    subprocess.run([bin_dir / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={address[10:]}",
                    "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={temp}"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        subprocess.run([bin_dir / "serve", "run", str(tmp_path / "serve.yaml"), "--address", address,
                        "--non-blocking"], env=env, check=True, capture_output=True, timeout=300)
        front = FrontProcess(f"--ray-address={address}", "--replicas=1", env=env)
        try:
            assert "using the running Serve application 'loraplex'" in "".join(front.lines)
            with grpc.insecure_channel(front.target) as channel:
                gen = pb_grpc.GenerationServiceStub(channel)
                assert answer(gen, request("Hello", "s0", new=5))[0] == 5
            assert front.terminate(60) == 0
        finally:
            front.kill()
        assert len(replica_pids()) == 1           # the front left the application it found running
    finally:
        subprocess.run([bin_dir / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
    assert wait_for(lambda: not ray_processes_of(), 30), ray_processes_of()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
