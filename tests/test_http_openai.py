"""The OpenAI-compatible HTTP API through the official `openai` client (a client we did not write): completions,
chat and both streamed, models.list, logprobs and usage, each error as the SDK's typed exception. The oracle
for the answers is the gRPC answer to the same request on the same server (itself checked against HF and
PEFT elsewhere): greedy text and token counts equal, token logprobs within 1e-5 (the same engine on the same
batch-invariant path)."""

import grpc
import openai
import pytest

from http_server import ADAPTERS, base_url, http_server, make_adapters
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc

PROMPT = "The weather today is"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
NEW = 8
MODELS = ["", *ADAPTERS]       # "" = the base model


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = make_adapters(tiny_model_dir, tmp_path_factory.mktemp("adapters"))
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    server = http_server(tiny_model_dir, root)
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=base_url(server) + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def base_name(server):
    return server.running.model.name


@pytest.fixture(scope="module")
def grpc_stub(server):
    channel = grpc.insecure_channel(server.target)
    yield generation_pb2_grpc.GenerationServiceStub(channel)
    channel.close()


def grpc_answer(stub, adapter: str, chat: bool, new: int = NEW, top: int = 0, min_new: int = 0):
    prompt = {"messages": pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in MESSAGES])} if chat else {"text": PROMPT}
    return stub.Generate(pb.GenerateRequest(adapter_id=adapter, **prompt, params=pb.Parameters(
        stopping=pb.StoppingCriteria(max_new_tokens=new, min_new_tokens=min_new),
        response=pb.ResponseOptions(token_logprobs=True, top_n_tokens=top))), timeout=120)


@pytest.mark.parametrize("adapter", MODELS)
def test_completions_answer_as_grpc_does(client, grpc_stub, base_name, adapter):
    want = grpc_answer(grpc_stub, adapter, chat=False, top=2, min_new=NEW)
    got = client.completions.create(model=adapter or base_name, prompt=PROMPT, max_tokens=NEW, temperature=0,
                                    logprobs=2, extra_body={"min_tokens": NEW})
    choice = got.choices[0]
    assert choice.text == want.text and choice.finish_reason == "length" and got.model == (adapter or base_name)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.input_token_count, NEW)
    assert got.usage.total_tokens == want.input_token_count + NEW
    assert choice.logprobs.tokens == [t.text for t in want.tokens]
    assert choice.logprobs.token_logprobs == pytest.approx([t.logprob for t in want.tokens], abs=1e-5)
    assert [set(top) for top in choice.logprobs.top_logprobs] == [{t.text for t in w.top_tokens} for w in want.tokens]
    assert choice.logprobs.text_offset[1] == len(want.tokens[0].text)


@pytest.mark.parametrize("adapter", MODELS)
def test_chat_answers_as_grpc_does_through_the_chat_template(client, grpc_stub, base_name, adapter):
    want = grpc_answer(grpc_stub, adapter, chat=True, top=3)
    got = client.chat.completions.create(model=adapter or base_name, messages=MESSAGES, max_tokens=NEW,
                                         temperature=0, logprobs=True, top_logprobs=3)
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == ("length" if want.stop_reason == pb.MAX_TOKENS else "stop")
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.input_token_count,
                                                                      want.generated_token_count)
    entries = choice.logprobs.content
    assert [e.token for e in entries] == [t.text for t in want.tokens]
    assert [e.logprob for e in entries] == pytest.approx([t.logprob for t in want.tokens], abs=1e-5)
    assert all(bytes(e.bytes).decode() == e.token and len(e.top_logprobs) == 3 for e in entries)


def test_adapters_change_the_answer(client, base_name):
    texts = {m: client.completions.create(model=m or base_name, prompt=PROMPT, max_tokens=NEW, temperature=0,
                                          extra_body={"min_tokens": NEW}).choices[0].text for m in MODELS}
    assert len(set(texts.values())) == len(MODELS), texts


@pytest.mark.parametrize("chat", [False, True])
def test_a_stream_carries_the_whole_answer_and_the_usage(client, grpc_stub, base_name, chat):
    want = grpc_answer(grpc_stub, "small", chat)
    common = dict(model="small", max_tokens=NEW, temperature=0, stream=True, stream_options={"include_usage": True})
    if chat:
        chunks = list(client.chat.completions.create(messages=MESSAGES, **common))
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        chunks = list(client.completions.create(prompt=PROMPT, **common))
        pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == want.text and len([p for p in pieces if p]) > 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("length", "stop") and not any(finishes[:-1])
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == want.generated_token_count
    assert len({c.id for c in chunks}) == 1 and all(c.usage is None for c in chunks[:-1])


def test_seeded_sampling_repeats_and_stop_sequences_end_with_stop(client, base_name):
    def sample():
        return client.completions.create(model=base_name, prompt=PROMPT, max_tokens=NEW, temperature=0.9,
                                         top_p=0.95, seed=7, extra_body={"top_k": 20}).choices[0].text
    assert sample() == sample()
    whole = client.completions.create(model=base_name, prompt=PROMPT, max_tokens=NEW, temperature=0,
                                      extra_body={"min_tokens": NEW}).choices[0].text
    stop = whole[len(whole) // 2:][:3]
    cut = client.completions.create(model=base_name, prompt=PROMPT, max_tokens=NEW, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == whole[:whole.index(stop)]


def test_models_list_names_the_base_and_every_adapter(client, base_name):
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {base_name, *ADAPTERS, "broken"}
    assert all(listed[a].parent == base_name for a in ADAPTERS) and listed[base_name].owned_by == "loraplex"
    assert client.models.retrieve("team/all").id == "team/all"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing")


@pytest.mark.parametrize("call, param", [
    (dict(n=2), "n"),
    (dict(temperature=-1), "temperature"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_p=1.5), "top_p"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(logprobs=6), "logprobs"),
    (dict(echo=True), "echo"),
    (dict(extra_body={"max_tokenz": 3}), "max_tokenz"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(prompt=""), "prompt"),
    (dict(prompt=["one", "two"]), "prompt"),
    (dict(prompt=[1, 2, 3]), "prompt"),
    (dict(stop=[""]), "stop"),
    (dict(seed=-1), "seed"),
    (dict(max_tokens=10**6), "max_tokens"),
])
def test_invalid_completions_are_bad_requests_naming_the_parameter(client, base_name, call, param):
    args = {"model": base_name, "prompt": PROMPT, "max_tokens": 4, **call}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**args)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param + ":"), error


@pytest.mark.parametrize("call, param", [
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (dict(logprobs=False, top_logprobs=2), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(max_completion_tokens=0), "max_completion_tokens"),
    (dict(response_format={"type": "json_object"}), "response_format"),
])
def test_invalid_chats_are_bad_requests_naming_the_parameter(client, base_name, call, param):
    args = {"model": base_name, "messages": MESSAGES, **call}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**args)
    assert caught.value.body["param"] == param, caught.value.body


def test_text_parts_and_the_developer_role_are_chat_messages(client, grpc_stub, base_name):
    parts = [{"role": "developer", "content": "You are terse."},
             {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}]
    got = client.chat.completions.create(model=base_name, messages=parts, max_tokens=NEW, temperature=0)
    assert got.choices[0].message.content == grpc_answer(grpc_stub, "", chat=True).text


def test_an_unknown_model_is_not_found_and_the_server_keeps_serving(client, base_name):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=4)
    assert caught.value.body["code"] == "model_not_found" and "no-such-adapter" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        list(client.chat.completions.create(model="no-such-adapter", messages=MESSAGES, stream=True))
    assert client.completions.create(model="small", prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.parametrize("model", ["../small", "/etc/passwd", "%2e%2e/small", "a\x00b", "small/../../x"])
def test_a_model_that_is_a_path_is_refused_without_reading_it(client, model):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
    assert caught.value.body["param"] == "model", caught.value.body


def test_an_adapter_whose_files_cannot_be_served_is_a_bad_request_and_others_keep_working(client, grpc_stub):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="broken", messages=MESSAGES, max_tokens=2)
    assert caught.value.body["code"] == "failed_precondition" and "broken" in caught.value.body["message"]
    got = client.completions.create(model="small", prompt=PROMPT, max_tokens=NEW, temperature=0)
    assert got.choices[0].text == grpc_answer(grpc_stub, "small", chat=False).text
