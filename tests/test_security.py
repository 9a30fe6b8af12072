"""TLS, mTLS and bearer tokens through a real server and plain grpcio clients. Certificates are made here
with the openssl command: a CA, a server certificate for 127.0.0.1, and a client certificate."""

import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc as apb_grpc
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc
from servers import ServerThread


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", "san.ext", "-out", f"{name}.pem", cwd=d)
    return d


def request():
    return pb.GenerateRequest(text="Hello", params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=2)))


def code_of(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_tls_and_mtls(tiny_model_dir, pki):
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, tls_cert=str(pki / "server.pem"),
                          tls_key=str(pki / "server.key"), tls_client_ca=str(pki / "ca.pem"))
    try:
        ca = (pki / "ca.pem").read_bytes()
        with_cert = grpc.ssl_channel_credentials(ca, (pki / "client.key").read_bytes(),
                                                 (pki / "client.pem").read_bytes())
        with grpc.secure_channel(server.target, with_cert) as channel:
            assert pb_grpc.GenerationServiceStub(channel).Generate(request(), timeout=30).generated_token_count == 2
        with grpc.secure_channel(server.target, grpc.ssl_channel_credentials(ca)) as channel:   # no client cert
            assert code_of(lambda: pb_grpc.GenerationServiceStub(channel).Generate(request(), timeout=10)) == \
                grpc.StatusCode.UNAVAILABLE
        from loraplex.clients.cli import main

        tls = ["--target", server.target, "--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"),
               "--tls-key", str(pki / "client.key")]
        assert main(["generate", "Hello", "--max-new-tokens", "2", *tls]) == 0        # our CLI over mTLS
        assert main(["health", *tls]) == 0
        with grpc.insecure_channel(server.target) as channel:                                # plaintext
            assert code_of(lambda: pb_grpc.GenerationServiceStub(channel).Generate(request(), timeout=10)) == \
                grpc.StatusCode.UNAVAILABLE
        # the HTTP API on the same certificates, through curl: HTTPS with a client certificate only
        url = f"https://127.0.0.1:{server.running.http.port}/v1/models"
        listed = subprocess.run(["curl", "-sf", "--cacert", pki / "ca.pem", "--cert", pki / "client.pem",
                                 "--key", pki / "client.key", url], capture_output=True, text=True, timeout=30)
        assert listed.returncode == 0 and '"object":"list"' in listed.stdout, listed
        no_cert = subprocess.run(["curl", "-sf", "--cacert", pki / "ca.pem", url], capture_output=True, timeout=30)
        plain = subprocess.run(["curl", "-sf", url.replace("https", "http")], capture_output=True, timeout=30)
        assert no_cert.returncode != 0 and plain.returncode != 0
    finally:
        server.close()


def test_tokens(tiny_model_dir, tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, adapter_roots=str(root),
                          auth_token="gen-secret", admin_token="admin-secret")
    try:
        with grpc.insecure_channel(server.target) as channel:
            gen, admin = pb_grpc.GenerationServiceStub(channel), apb_grpc.AdapterServiceStub(channel)
            bearer = lambda token: [("authorization", f"Bearer {token}")]   # noqa: E731
            assert code_of(lambda: gen.Generate(request(), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda: gen.Generate(request(), metadata=bearer("nope"), timeout=10)) == \
                grpc.StatusCode.UNAUTHENTICATED
            streamed = gen.GenerateStream(request(), metadata=bearer("nope"), timeout=10)
            assert code_of(lambda: list(streamed)) == grpc.StatusCode.UNAUTHENTICATED
            assert gen.Generate(request(), metadata=bearer("gen-secret"), timeout=30).generated_token_count == 2
            listing = apb.ListAdaptersRequest()
            assert code_of(lambda: admin.ListAdapters(listing, metadata=bearer("gen-secret"), timeout=10)) == \
                grpc.StatusCode.UNAUTHENTICATED                 # the generation token does not open admin
            assert admin.ListAdapters(listing, metadata=bearer("admin-secret"), timeout=10).adapters == []
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING   # probes need no secret
        http_api(server)
        refused = server.running.metrics.registry.get_sample_value
        assert refused("loraplex_unauthenticated_calls_total", {"service": "http"}) == 3
        assert refused("loraplex_unauthenticated_calls_total", {"service": "loraplex.v1.GenerationService"}) == 3
        assert refused("loraplex_unauthenticated_calls_total", {"service": "loraplex.v1.AdapterService"}) == 1
        from loraplex.clients.cli import main

        assert main(["adapters", "list", "--target", server.target, "--token", "admin-secret"]) == 0
        assert main(["generate", "Hi", "--max-new-tokens", "2", "--target", server.target, "--token", "nope"]) != 0
    finally:
        server.close()


def http_api(server):
    """The HTTP API takes the generation token, through the official openai client; /health needs none."""
    import urllib.request

    import openai

    url = f"http://127.0.0.1:{server.running.http.port}"
    for key in ("nope", ""):
        client = openai.OpenAI(base_url=url + "/v1", api_key=key or "unset", max_retries=0,
                               default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as refused:
            client.completions.create(model=server.running.model.name, prompt="Hi", max_tokens=2)
        assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="admin-secret", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key="gen-secret", max_retries=0)
    assert client.completions.create(model=server.running.model.name, prompt="Hi", max_tokens=2).usage.completion_tokens
    assert urllib.request.urlopen(url + "/health", timeout=10).status == 200
