"""`loraplex train` on the embedded model (short runs): two trained adapters show their behaviour on
questions they never saw while sharing one batch, every kind trains into files the server serves, and a
continued training run is published as a new version under load with no failed request; PEFT with the
adapter's files on the NF4 base is the oracle for the tokens before and after the swap."""

import json
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

import adapter_kinds
from loraplex.adapters import train
from loraplex.adapters.formats import read_adapter
from loraplex.server.model.config import ModelConfig
from loraplex.v1 import generation_pb2 as pb
from servers import ServerThread

CAPS_STEPS, JSON_STEPS = 60, 24     # caps: the demo's own settings (60 steps, lr 1e-3)


def cli(*args, timeout=600):
    done = subprocess.run([sys.executable, "-m", "loraplex.clients.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    summary = json.loads(cli("train", str(root / "caps"), "--task", "caps", "--steps", str(CAPS_STEPS))
                         .splitlines()[-1])
    assert summary["loss_last"] < summary["loss_first"] / 2
    train.train(root / "json", task="json", kind="dora", steps=JSON_STEPS, lr=2e-3, progress=False)
    return root


def ask(stub, question, adapter, new_tokens=24, exact=False):
    """exact: exactly new_tokens tokens (EOS held back), returned with their ids, to compare with PEFT."""
    stopping = pb.StoppingCriteria(max_new_tokens=new_tokens, min_new_tokens=new_tokens if exact else 0)
    request = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=question)]),
                                 adapter_id=adapter, params=pb.Parameters(
                                     stopping=stopping, response=pb.ResponseOptions(token_logprobs=exact)))
    return stub.Generate(request, timeout=300)


def upper_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


def test_trained_adapters_show_their_task_on_held_out_questions_in_one_batch(trained, stub_for):
    assert not set(train.HELD_OUT) & set(train.QUESTIONS)
    server = ServerThread(max_batch_size=32, kv_cache_mb=64, adapter_roots=str(trained), adapter_slots=4)
    answers = {}
    try:
        stub = stub_for(server.target)

        def run(question, adapter):
            answers[(question, adapter)] = ask(stub, question, adapter).text

        threads = [threading.Thread(target=run, args=(q, a)) for q in train.HELD_OUT for a in ("", "caps", "json")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        formats = {s.adapter_id: s.format for s in server.engine.adapters.catalog()}
    finally:
        server.close()
    assert formats == {"caps": "lora", "json": "dora"}
    base = [answers[(q, "")] for q in train.HELD_OUT]
    caps = [answers[(q, "caps")] for q in train.HELD_OUT]
    jsons = [answers[(q, "json")] for q in train.HELD_OUT]
    assert upper_share("".join(base)) < 0.2
    assert upper_share("".join(caps)) > 0.8, caps
    assert not any(a.lstrip().startswith('{"answer": "') for a in base)
    assert all(a.lstrip().startswith('{"answer": "') for a in jsons), jsons


@pytest.mark.parametrize("kind", ["qlora", "adalora"])
def test_every_kind_trains_into_files_the_server_reads(tmp_path, embedded_dir, kind):
    out = tmp_path / kind
    summary = train.train(out, task="json", kind=kind, steps=4, progress=False)
    assert summary["steps_total"] == 4 and (out / "trainer_state.safetensors").is_file()
    config = ModelConfig.from_hf(AutoConfig.from_pretrained(embedded_dir))
    adapter = read_adapter(out, kind, config, max_rank=64)
    assert adapter.format == {"qlora": "lora", "adalora": "adalora"}[kind]
    summary = train.train(out, steps=2, resume=True, progress=False)     # task and kind come from the saved state
    assert (summary["steps_total"], summary["kind"], summary["task"]) == (6, kind, "json")


def test_demo_asks_the_base_model_and_both_adapters_in_one_batch(trained):
    """`loraplex demo` (what `make run` runs) with its adapters already trained: it skips training and
    prints the three answers to its question."""
    from loraplex.clients import demo

    out = cli("demo", "--adapters", str(trained))
    assert "training the demo adapter" not in out
    section = out.split(f"one batch, three answers> {demo.DEMO_ADAPTER_QUESTION}")[1].split("metrics (")[0]
    lines = [line.strip() for line in section.strip().splitlines()]
    answers = dict(zip(lines[0::2], lines[1::2]))
    assert set(answers) == {"base model:", "adapter caps (answers in capital letters):",
                            "adapter json (answers as a JSON object):"}, lines
    assert upper_share(answers["adapter caps (answers in capital letters):"]) > 0.8
    assert answers["adapter json (answers as a JSON object):"].startswith('{"answer": "')
    assert upper_share(answers["base model:"]) < 0.2 and not answers["base model:"].startswith("{")
    assert demo.DEMO_ADAPTER_QUESTION not in train.QUESTIONS


def test_resume_refuses_another_task(trained, tmp_path):
    with pytest.raises(ValueError, match="--resume keeps both"):
        train.train(shutil.copytree(trained / "json", tmp_path / "j"), task="caps", steps=1, resume=True,
                    progress=False)


def test_continued_training_is_published_under_load_with_no_failed_request(trained, tmp_path, embedded_dir,
                                                                          stub_for):
    root = tmp_path / "root"
    shutil.copytree(trained / "caps", root / "caps")
    old_files = shutil.copytree(trained / "caps", tmp_path / "caps-old")
    question = train.HELD_OUT[0]
    server = ServerThread(max_batch_size=16, kv_cache_mb=64, adapter_roots=str(root), adapter_slots=4)
    stop, outcomes, lock = threading.Event(), {"ok": 0, "failed": []}, threading.Lock()
    try:
        stub = stub_for(server.target)
        before = ask(stub, question, "caps", 12, exact=True)

        def load():
            while not stop.is_set():
                for adapter in ("caps", ""):
                    try:
                        ask(stub, question, adapter, 6)
                        with lock:
                            outcomes["ok"] += 1
                    except Exception as exc:   # any failure at all is what this test looks for
                        with lock:
                            outcomes["failed"].append(repr(exc))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        cli("train", str(root / "caps"), "--resume", "--steps", "6")
        listed = cli("adapters", "load", "caps", "--target", server.target)
        after = ask(stub, question, "caps", 12, exact=True)
        stop.set()
        for t in threads:
            t.join(120)
        status = {s.adapter_id: s for s in server.engine.adapters.catalog()}["caps"]
    finally:
        stop.set()
        server.close()
    assert outcomes["failed"] == [] and outcomes["ok"] >= 8, outcomes
    assert status.version == 2 and json.loads(listed)["version"] == 2, listed
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    prompt = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                     add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False).input_ids
    assert [t.token_id for t in before.tokens] == adapter_kinds.peft_greedy(embedded_dir, old_files, prompt, 12)
    assert [t.token_id for t in after.tokens] == adapter_kinds.peft_greedy(embedded_dir, root / "caps", prompt, 12)
    assert json.loads((root / "caps" / "training.json").read_text())["steps"] == CAPS_STEPS + 6
