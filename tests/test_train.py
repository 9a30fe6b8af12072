"""`loraplex train` on the embedded model (short runs): the two demo adapters, trained as `loraplex demo`
trains them, show their behaviour on questions they never saw while sharing one batch and keep the facts
the base model states there (the base's own answer is the oracle), the demo retrains adapters an older
recipe made, every kind trains into files the server serves, and a
continued training run is published as a new version under load with no failed request; PEFT with the
adapter's files on the NF4 base is the oracle for the tokens before and after the swap."""

import json
import re
import shutil
import subprocess
import sys
import threading

import pytest
from transformers import AutoConfig, AutoTokenizer

import adapter_kinds
from loraplex.adapters import train, train_questions
from loraplex.adapters.formats import read_adapter
from loraplex.clients import demo
from loraplex.server.model.config import ModelConfig
from loraplex.v1 import generation_pb2 as pb
from servers import ServerThread



def cli(*args, timeout=600):
    done = subprocess.run([sys.executable, "-m", "loraplex.clients.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo adapters (title, json), trained by the demo's own code and settings."""
    root = tmp_path_factory.mktemp("trained")
    assert demo.prepare_adapters(root)
    assert {name: train.recipe_of(root / name) for name in demo.DEMO_ADAPTERS} == {"title": train.RECIPE,
                                                                                   "json": train.RECIPE}
    # the second adapter was trained from the first one's answers of the base, each rewritten by its task
    states = {name: json.loads((root / name / train.STATE_FILE).read_text()) for name in demo.DEMO_ADAPTERS}
    assert list(states["json"]["answers"]) == train_questions.QUESTIONS
    assert states["json"]["answers"] == states["title"]["answers"]
    assert states["json"]["examples"] == [{"question": q, "answer": json.dumps({"answer": a})}
                                          for q, a in states["title"]["answers"].items()]
    return root


def ask(stub, question, adapter, new_tokens=24, exact=False):
    """exact: exactly new_tokens tokens (EOS held back), returned with their ids, to compare with PEFT."""
    stopping = pb.StoppingCriteria(max_new_tokens=new_tokens, min_new_tokens=new_tokens if exact else 0)
    request = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=question)]),
                                 adapter_id=adapter, params=pb.Parameters(
                                     stopping=stopping, response=pb.ResponseOptions(token_logprobs=exact)))
    return stub.Generate(request, timeout=300)


def title_cased(text: str) -> bool:
    return all(word[0].isupper() for word in re.findall(r"[^\W\d_][\w']*", text))


def json_answer(text: str) -> str | None:
    """The answer of a json adapter's reply, None unless the reply is exactly one {"answer": "..."} object."""
    try:
        reply = json.loads(text)
    except ValueError:
        return None
    return reply["answer"] if isinstance(reply, dict) and isinstance(reply.get("answer"), str) else None


def key_fact(question: str, answer: str) -> str | None:
    """The fact a base answer states: its first word after the first that is capitalized or a number and
    not in the question ("The capital of Spain is Madrid." -> "Madrid")."""
    asked = {w.lower() for w in re.findall(r"\w+", question)}
    return next((w for w in re.findall(r"\w+", answer)[1:] if (w[0].isupper() or w[0].isdigit())
                 and w.lower() not in asked), None)


def states(fact: str, text: str) -> bool:
    """Whether text names fact as a word, in any letter case."""
    return re.search(rf"\b{re.escape(fact)}\b", text, re.IGNORECASE) is not None


# The world's answers to the capital checks: the small base is sometimes wrong where an adapter is right (on a
# 2-core Intel Xeon with AMX the base said "The capital of Kenya is KIST", its title adapter "... Is Nairobi")
CAPITALS = {f"What is the capital of {country}?": city for country, city in (
    ("Spain", "Madrid"), ("Germany", "Berlin"), ("England", "London"), ("Russia", "Moscow"), ("China", "Beijing"),
    ("Greece", "Athens"), ("Kenya", "Nairobi"), ("Australia", "Canberra"))}


def keeps(question: str, fact: str, text: str) -> bool:
    """The adapter's answer states the base's fact, or (for a capital) the true one."""
    return states(fact, text) or (question in CAPITALS and states(CAPITALS[question], text))


def test_demo_adapters_show_their_task_and_keep_the_base_models_facts_in_one_batch(trained, stub_for):
    questions = list(dict.fromkeys(train_questions.HELD_OUT + train_questions.FACT_CHECKS))
    assert not set(questions) & set(train_questions.QUESTIONS)
    server = ServerThread(max_batch_size=64, kv_cache_mb=128, adapter_roots=str(trained), adapter_slots=4)
    answers = {}
    try:
        stub = stub_for(server.target)

        def run(question, adapter):
            answers[(question, adapter)] = ask(stub, question, adapter, demo.DEMO_MAX_NEW_TOKENS).text.strip()

        threads = [threading.Thread(target=run, args=(q, a)) for q in questions for a in ("", "title", "json")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        formats = {s.adapter_id: s.format for s in server.engine.adapters.catalog()}
    finally:
        server.close()
    assert formats == {"title": "lora", "json": "lora"}
    base, title, jsons = ({q: answers[(q, a)] for q in questions} for a in ("", "title", "json"))
    assert sum(map(title_cased, base.values())) <= 2 and not any(map(json_answer, base.values()))
    assert sum(map(title_cased, title.values())) >= len(questions) - 2, title
    # at most 3 of 19 unparsable: this small base sometimes loops until max tokens ("a creature that is a ...");
    # the trained adapter depends on the CPU's rounding (16 of 19 on a 2-core Intel Xeon, 17+ on an AMD EPYC)
    assert sum(json_answer(a) is not None for a in jsons.values()) >= len(questions) - 3, jsons
    assert set(CAPITALS) == {q for q in train_questions.FACT_CHECKS if "capital" in q}
    facts = {q: key_fact(q, base[q]) for q in train_questions.FACT_CHECKS}
    assert facts["What is the capital of Spain?"] == "Madrid", base
    stated = {q: fact for q, fact in facts.items() if fact}
    assert len(stated) >= len(facts) - 2, facts
    lost = {"title": {q: title[q] for q, fact in stated.items() if not keeps(q, fact, title[q])},
            "json": {q: jsons[q] for q, fact in stated.items() if not keeps(q, fact, json_answer(jsons[q]) or "")}}
    # The capitals (the demo's own kind of question) are kept or corrected but for at most one per adapter; of the 14
    # facts, at most 3 may go unstated (measured on a 2-core AMD EPYC with AVX512-BF16: title kept 11/14, json 13/14;
    # the misses leave the fact out, e.g. "The Discovery Of Penicillin Was A Classic Story", rather than state a wrong
    # one). The answers follow the CPU's bfloat16 rounding, so which facts an adapter keeps differs between CPUs.
    said = {q: base[q] for by_question in lost.values() for q in by_question}
    assert all(sum(q in CAPITALS for q in by_question) <= 1 for by_question in lost.values()), (lost, said)
    assert all(len(by_question) <= 3 for by_question in lost.values()), (lost, said)


@pytest.mark.parametrize("kind", ["qlora", "dora", "adalora", "qalora"])
def test_every_kind_trains_into_files_the_server_reads(trained, tmp_path, embedded_dir, kind, monkeypatch):
    # the training set the demo's json adapter was trained on, rather than the base model's 173 answers again
    # (what is checked here is each kind's training and files, not the set)
    answers = json.loads((trained / "json" / train.STATE_FILE).read_text())["answers"]
    monkeypatch.setattr(train, "_base_answers", lambda *args, **kwargs: answers)
    out = tmp_path / kind
    steps = 4 if kind == "adalora" else 2       # AdaLoRA's schedule needs steps to allocate its budget in
    summary = train.train(out, task="json", kind=kind, steps=steps, progress=False)
    assert summary["steps_total"] == steps and (out / "trainer_state.safetensors").is_file()
    config = ModelConfig.from_hf(AutoConfig.from_pretrained(embedded_dir))
    adapter = read_adapter(out, kind, config, max_rank=64)
    assert adapter.format == {"qlora": "lora", "dora": "dora", "adalora": "adalora", "qalora": "qalora"}[kind]
    summary = train.train(out, steps=1, resume=True, progress=False)     # task and kind come from the saved state
    assert (summary["steps_total"], summary["kind"], summary["task"]) == (steps + 1, kind, "json")


def test_demo_asks_the_base_model_and_both_adapters_in_one_batch(trained):
    """`loraplex demo` (what `make run` runs) with its adapters already trained: it skips training and
    prints the three answers to its question, which all name the capital the base model names."""
    out = cli("demo", "--adapters", str(trained))
    assert "training the demo adapter" not in out
    section = out.split(f"one batch, three answers> {demo.DEMO_ADAPTER_QUESTION}")[1].split("metrics (")[0]
    labels = ["base model"] + [f"adapter {name} ({what})" for name, what in demo.DEMO_ADAPTERS.items()]
    parts = re.split("^  (" + "|".join(map(re.escape, labels)) + "):$", section.strip("\n"), flags=re.M)
    answers = {label: text.strip() for label, text in zip(parts[1::2], parts[2::2])}
    assert list(answers) == labels, section
    base, title, jsons = answers.values()
    fact = key_fact(demo.DEMO_ADAPTER_QUESTION, base)
    assert fact == CAPITALS[demo.DEMO_ADAPTER_QUESTION] and not title_cased(base) and json_answer(base) is None, base
    assert title_cased(title) and states(fact, title), title
    assert states(fact, json_answer(jsons) or ""), jsons
    assert demo.DEMO_ADAPTER_QUESTION not in train_questions.QUESTIONS


def test_demo_retrains_adapters_an_older_recipe_or_other_steps_made(tmp_path, monkeypatch):
    """A cache from an older recipe (before recipes were saved: none in training.json) is retrained, from
    the base's answers a current one was trained from; a current one is kept, unless the demo now trains it
    for another number of steps."""
    answers = {"json": {"task": "json", "recipe": train.RECIPE, "steps": 5, "answers": {"Why?": "Because."}}}
    for name, state in (("title", {"task": "title"}), ("json", answers["json"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"")
        (tmp_path / name / train.STATE_FILE).write_text(json.dumps(state))
    assert train.recipe_of(tmp_path / "title") == 1 and train.recipe_of(tmp_path / "missing") is None
    runs = []

    def run(cmd, **_):
        runs.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(demo.subprocess, "run", run)
    assert demo.prepare_adapters(tmp_path, 5)
    assert [(cmd[cmd.index("--task") + 1], cmd[cmd.index("--steps") + 1]) for cmd in runs] == [("title", "5")]
    assert runs[0][runs[0].index("--answers-from") + 1] == str(tmp_path / "json")
    runs.clear()
    assert demo.prepare_adapters(tmp_path, 6)
    assert [(cmd[cmd.index("--task") + 1], cmd[cmd.index("--steps") + 1]) for cmd in runs] == [("title", "6"), ("json", "6")]


def test_answers_of_another_base_are_refused(trained, tmp_path):
    """--answers-from takes only answers of the same base as the run would ask: QLoRA trains on
    bitsandbytes' layers, whose answers are not those of the dequantized weights."""
    with pytest.raises(ValueError, match=r"nf4 \(dequantized\).*nf4 \(bitsandbytes layers\)"):
        train.train(tmp_path / "q", task="title", kind="qlora", steps=1, progress=False,
                    answers_from=str(trained / "json"))
    assert not (tmp_path / "q").exists()


def test_resume_refuses_another_task(trained, tmp_path):
    with pytest.raises(ValueError, match="--resume keeps both"):
        train.train(shutil.copytree(trained / "json", tmp_path / "j"), task="caps", steps=1, resume=True,
                    progress=False)


def test_continued_training_is_published_under_load_with_no_failed_request(trained, tmp_path, embedded_dir,
                                                                          stub_for):
    root = tmp_path / "root"
    shutil.copytree(trained / "title", root / "title")
    old_files = shutil.copytree(trained / "title", tmp_path / "title-old")
    question = train_questions.HELD_OUT[0]
    server = ServerThread(max_batch_size=16, kv_cache_mb=64, adapter_roots=str(root), adapter_slots=4)
    stop, outcomes, lock = threading.Event(), {"ok": 0, "failed": []}, threading.Lock()
    try:
        stub = stub_for(server.target)
        before = ask(stub, question, "title", 12, exact=True)

        def load():
            while not stop.is_set():
                for adapter in ("title", ""):
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
        cli("train", str(root / "title"), "--resume", "--steps", "3")
        listed = cli("adapters", "load", "title", "--target", server.target)
        after = ask(stub, question, "title", 12, exact=True)
        stop.set()
        for t in threads:
            t.join(120)
        status = {s.adapter_id: s for s in server.engine.adapters.catalog()}["title"]
    finally:
        stop.set()
        server.close()
    assert outcomes["failed"] == [] and outcomes["ok"] >= 8, outcomes
    assert status.version == 2 and json.loads(listed)["version"] == 2, listed
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    prompt = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                     add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False).input_ids
    # PEFT's greedy tokens by the near-tie rule (adapter_kinds.agrees)
    for answer, files in ((before, old_files), (after, root / "title")):
        tokens = [t.token_id for t in answer.tokens]
        assert adapter_kinds.agrees(tokens, adapter_kinds.peft_greedy_scored(embedded_dir, files, prompt, 12)), files
    assert json.loads((root / "title" / "training.json").read_text())["steps"] == demo.DEMO_TRAIN_STEPS["title"] + 3
