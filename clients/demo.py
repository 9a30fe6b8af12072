"""`loraplex demo`: start `loraplex serve` on a free port, stream two answers from it, ask it once more through
its OpenAI-compatible HTTP API, ask one question of the base model and two demo adapters in one batch, show
a few of its metrics, and stop it (SIGTERM, as a supervisor would).

The demo adapters (`title`: answers in Title Case; `json`: answers as a JSON object) are trained once with
`loraplex train` into the cache directory, about two minutes each on a CPU; later runs reuse them, and
retrain those an older training recipe made. With --model (another base) or --no-adapters the demo skips
them.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from .client import Client
from .errors import DeadlineExceeded, Unavailable
from .output import print_stream, summary

DEMO_QUESTION = "What is the capital of France?"
DEMO_PROMPT = "The three primary colors are"
DEMO_MAX_NEW_TOKENS = 48
# Adapter name (= its training task) -> what it does; trained on other questions than DEMO_ADAPTER_QUESTION.
# No `caps`: in capitals this base model's facts do not survive training (see adapters/train.py).
DEMO_ADAPTERS = {"title": "answers in Title Case", "json": "answers as a JSON object"}
# Training steps per demo adapter, and the question all three answer in one batch. Measured under PEFT on a
# 2-core AMD EPYC, greedy to EOS or 48 tokens over 10 capital questions, as the smallest gap between the top
# two log-probabilities on the answer's path (where a last-bit change in the arithmetic can flip a token):
#   title, 60 steps: "Spain" 0.025 nats ("Madrid" over "Barcelona"), "England" 0.048 (a loop); 80 steps: every
#   answer one clean sentence, every gap 0.85 or more; 100 steps: "Barcelona".
#   json, 60 steps: "Spain" 0.003 (its sentence ends or loops), "Italy" 0.054, Germany 2.26; 80 steps: it lost
#   Moscow and Canberra.
# Germany's answers: base 0.157 (at its last token), title (80 steps) 0.916, json (60 steps) 2.26.
DEMO_TRAIN_STEPS = {"title": 80, "json": 60}
DEMO_ADAPTER_QUESTION = "What is the capital of Germany?"
DEMO_OPENAI_QUESTION = "What is the capital of Italy?"
STOP_WAIT_SECONDS = 30.0


def run_demo(args, server_flags: list[str]) -> int:
    root = None
    if not args.no_adapters and not any(f == "--model" or f.startswith("--model=") for f in server_flags):
        root = pathlib.Path(args.adapters or default_adapter_root())
        if not prepare_adapters(root, args.train_steps):
            return 1
        server_flags = ["--adapter-roots", str(root), *server_flags]
    port, metrics_port, http_port = args.port or free_port(), free_port(), free_port()
    target = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="loraplex-demo-") as tmp:
        log_path = pathlib.Path(tmp) / "server.log"
        server = _start_server(port, metrics_port, ["--http-port", str(http_port), *server_flags], log_path)
        previous = _interrupt_on_sigterm()   # the server has its own session: a killed demo must stop it
        try:
            if not _wait_for_server(server, target, log_path, args.startup_timeout):
                return 1
            _ask(target)
            _ask_openai(f"http://127.0.0.1:{http_port}")
            if root is not None:
                _ask_adapters(target)
            _show_metrics(f"http://127.0.0.1:{metrics_port}/metrics")
        finally:
            code = _stop_server(server)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if code not in (0, -signal.SIGTERM):
            print(f"the server exited with code {code}:\n{_tail(log_path)}", file=sys.stderr)
            return 1
    print("server stopped.")
    return 0


def _interrupt_on_sigterm():
    """SIGTERM raises KeyboardInterrupt (so cleanup runs); returns the old handler, None off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    return signal.signal(signal.SIGTERM, interrupt)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, server_flags: list[str], metrics_port: int = 0) -> list[str]:
    # The user's flags come last so that theirs win (argparse keeps the last value).
    return [sys.executable, "-m", "loraplex.clients.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port), *server_flags]


def _start_server(port: int, metrics_port: int, server_flags: list[str], log_path: pathlib.Path) -> subprocess.Popen:
    print(f"starting loraplex serve on 127.0.0.1:{port} "
          "(the first start converts the embedded model once; that can take about a minute)", flush=True)
    with open(log_path, "wb") as log:
        # Own session: Ctrl-C reaches only the demo, which then stops the server with SIGTERM.
        return subprocess.Popen(server_command(port, server_flags, metrics_port), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_for_server(server: subprocess.Popen, target: str, log_path: pathlib.Path, timeout: float) -> bool:
    """Polls health until SERVING, printing progress; False (with the log's tail) if the server dies or stalls."""
    start = last_report = time.monotonic()
    with Client(target) as client:
        while server.poll() is None:
            elapsed = time.monotonic() - start
            try:
                if client.health(timeout=1.0) == "SERVING":
                    print(f"server ready after {elapsed:.0f}s", flush=True)
                    return True
            except (Unavailable, DeadlineExceeded):
                pass   # not listening yet
            if elapsed > timeout:
                print(f"the server was not SERVING after {timeout:g}s:\n{_tail(log_path)}", file=sys.stderr)
                return False
            if time.monotonic() - last_report >= 5.0:
                print(f"  waiting ({elapsed:.0f}s): {_tail(log_path, 1)}", flush=True)
                last_report = time.monotonic()
            time.sleep(0.5)
    print(f"the server exited with code {server.returncode}:\n{_tail(log_path)}", file=sys.stderr)
    return False


def _ask(target: str) -> None:
    with Client(target, timeout=300.0) as client:
        info = client.model_info()
        print(f"\nmodel {info.model_name}: {info.quantization}, {info.compute_dtype} on {info.device}")
        print(f"\nchat> {DEMO_QUESTION}")
        result, _ = print_stream(client.generate_stream(
            messages=[{"role": "user", "content": DEMO_QUESTION}], max_new_tokens=DEMO_MAX_NEW_TOKENS))
        print(summary(result))
        print(f"\ncompletion> {DEMO_PROMPT}")
        result, _ = print_stream(client.generate_stream(DEMO_PROMPT, max_new_tokens=DEMO_MAX_NEW_TOKENS))
        print(summary(result) + "\n")


def _ask_openai(url: str) -> None:
    """The same server through its OpenAI-compatible API (any OpenAI client can use it): what /v1/models
    lists, and one chat completion, from the title adapter when there is one."""
    models = [m["id"] for m in _http_json(url + "/v1/models")["data"]]
    model = "title" if "title" in models else models[0]
    print(f"OpenAI-compatible API at {url}/v1 (models: {', '.join(models)})")
    print(f"POST /v1/chat/completions, model {model}> {DEMO_OPENAI_QUESTION}")
    answer = _http_json(url + "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": DEMO_OPENAI_QUESTION}],
        "max_tokens": DEMO_MAX_NEW_TOKENS, "temperature": 0})
    print(f"  {answer['choices'][0]['message']['content'].strip()}\n")


def _http_json(url: str, body: dict | None = None) -> dict:
    import json
    import urllib.request

    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def default_adapter_root() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "loraplex" / "demo-adapters"


def prepare_adapters(root: pathlib.Path, steps: int | None = None) -> bool:
    """Trains each demo adapter that `root` lacks or that an older recipe or another number of steps made
    (`loraplex train`, with its progress bar; steps: for every adapter, else DEMO_TRAIN_STEPS); the base
    model's answers the first one was trained from serve the others too."""
    from loraplex.adapters.train import RECIPE, has_answers, recipe_of, steps_of

    answered = next((root / name for name in DEMO_ADAPTERS if recipe_of(root / name) == RECIPE
                     and has_answers(root / name)), None)
    for name, what in DEMO_ADAPTERS.items():
        recipe, wanted = recipe_of(root / name), steps or DEMO_TRAIN_STEPS[name]
        if recipe == RECIPE and steps_of(root / name) == wanted:
            continue
        why = ("once; later runs reuse it" if recipe is None else
               f"again: an older training recipe ({recipe}) made it" if recipe != RECIPE else
               f"again: {steps_of(root / name)} steps made it, the demo trains {wanted}")
        print(f"training the demo adapter {name!r} ({what}) into {root / name}, {why}", flush=True)
        reuse = ["--answers-from", str(answered)] if answered else []
        done = subprocess.run([sys.executable, "-m", "loraplex.adapters.train", str(root / name), "--task", name,
                               "--steps", str(wanted), *reuse], stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            print(f"training the demo adapter {name!r} failed (exit {done.returncode})", file=sys.stderr)
            return False
        answered = answered or root / name
    return True


def _ask_adapters(target: str) -> None:
    """The same question to the base model and to each demo adapter at once: one batch serves them all."""
    answers: dict[str, str] = {}
    with Client(target, timeout=300.0) as client:
        def ask(adapter: str):
            answers[adapter] = client.generate(messages=[{"role": "user", "content": DEMO_ADAPTER_QUESTION}],
                                               adapter_id=adapter, max_new_tokens=DEMO_MAX_NEW_TOKENS).text
        threads = [threading.Thread(target=ask, args=(a,)) for a in ("", *DEMO_ADAPTERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(f"one batch, three answers> {DEMO_ADAPTER_QUESTION}")
    for adapter in ("", *DEMO_ADAPTERS):
        label = f"adapter {adapter} ({DEMO_ADAPTERS[adapter]})" if adapter else "base model"
        print(f"  {label}:\n    {answers.get(adapter, '(no answer)').strip()}")
    print()


def _show_metrics(url: str) -> None:
    """A few of the server's Prometheus metrics, as a scrape sees them."""
    import urllib.request
    from collections import Counter

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError as exc:
        print(f"(no metrics from {url}: {exc})")
        return
    total: Counter[str] = Counter()          # each sample name summed over its labels
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            total[sample.name] += sample.value

    def mean_ms(histogram: str) -> str:
        count = total[histogram + "_count"]
        return f"{total[histogram + '_sum'] / count * 1000:.0f} ms" if count else "-"

    print(f"metrics ({url}):")
    print(f"  requests finished {total['loraplex_request_success_total']:.0f}, failed "
          f"{total['loraplex_request_failure_total']:.0f}; prompt tokens {total['loraplex_prompt_tokens_total']:.0f}, "
          f"generated tokens {total['loraplex_generation_tokens_total']:.0f}")
    print(f"  mean time to first token {mean_ms('loraplex_time_to_first_token_seconds')}, "
          f"mean inter-token latency {mean_ms('loraplex_inter_token_latency_seconds')}\n")


def _stop_server(server: subprocess.Popen) -> int:
    if server.poll() is None:
        print("stopping the server...", flush=True)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(STOP_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return server.returncode


def _tail(log_path: pathlib.Path, lines: int = 20) -> str:
    # Progress bars rewrite their line with \r: each rewrite counts as a line here.
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    parts = [p for p in text.replace("\r", "\n").split("\n") if p.strip()]
    return "\n".join(parts[-lines:]) if parts else "(no output)"
