"""Server configuration: one validated dataclass; every field is a CLI flag and an environment variable.

A field `max_batch_size` is the flag `--max-batch-size` and the variable `LORAPLEX_MAX_BATCH_SIZE`.
Precedence: flag, then environment, then the default.
"""

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

ENV_PREFIX = "LORAPLEX_"


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ServerConfig:
    model: str = _opt("", "HF-format Llama-family checkpoint directory; empty = the embedded SmolLM2-135M-Instruct")
    cache_dir: str = _opt("", "where converted models are kept; empty = $XDG_CACHE_HOME/loraplex")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = _opt("auto", "compute dtype: float32, bfloat16, float16 or auto (float32 on cpu, bfloat16 on cuda)")
    quant: str = _opt("nf4", "format of the base's 4-bit decoder linears: nf4 (bitsandbytes) or int4 (group-wise "
                             "asymmetric, torch's kernels; CPU only so far)")
    quant_blocksize: int = _opt(64, "NF4 quantization block size (64, 128, 256, ...)")
    quant_group_size: int = _opt(64, "INT4 input columns per scale and zero (32, 64, 128 or 256)")
    kv_cache_mb: int = _opt(256, "memory for the KV cache, in MiB")
    kv_block_size: int = _opt(16, "tokens per KV cache block")
    max_batch_size: int = _opt(32, "most sequences decoded together in one step")
    max_prefill_tokens: int = _opt(2048, "most prompt tokens prefilled in one step (without --prefill-chunk-tokens)")
    prefill_chunk_tokens: int = _opt(0, "chunked prefill: prompts are cut into pieces of this many tokens, fed beside "
                                        "the running decodes, so no stream waits for a whole prefill; 0 = whole "
                                        "prompts in steps of their own (docs/operations.md: the trade-off)")
    prefill_step_tokens: int = _opt(0, "with --prefill-chunk-tokens, the most prompt tokens a step feeds beside its "
                                       "decodes; 0 = one chunk")
    max_step_tokens: int = _opt(0, "with --prefill-chunk-tokens, the most tokens a step computes, its decodes included: "
                                   "prompt pieces fill what the decodes leave, at least one piece a step; 0 = "
                                   "--prefill-step-tokens beside any number of decodes")
    max_queue_size: int = _opt(256, "most requests waiting; more get RESOURCE_EXHAUSTED")
    max_sequence_length: int = _opt(0, "prompt + generated tokens per request; 0 = the model's context window")
    max_new_tokens: int = _opt(1024, "upper limit a request may ask for")
    default_max_new_tokens: int = _opt(64, "used when a request leaves max_new_tokens unset")
    max_prompt_tokens: int = _opt(0, "longest prompt accepted, in tokens (after truncate_input_tokens); 0 = the "
                                     "context window")
    max_message_bytes: int = _opt(4 * 2**20, "largest gRPC message received or sent; larger ones get "
                                             "RESOURCE_EXHAUSTED")
    max_concurrent_rpcs: int = _opt(1024, "RPCs served at once; more get RESOURCE_EXHAUSTED")
    max_concurrent_streams: int = _opt(128, "HTTP/2 streams per client connection (more wait in the client for "
                                            "one to end)")
    keepalive_time_ms: int = _opt(60_000, "ping an idle client connection this often")
    keepalive_timeout_ms: int = _opt(20_000, "close a connection whose ping is not answered within this")
    keepalive_min_ping_interval_ms: int = _opt(10_000, "clients pinging more often than this are told to go away")
    adapter_roots: str = _opt("", "directories holding LoRA adapters (PEFT format), separated by ':'; "
                                  "empty = adapters off")
    max_lora_rank: int = _opt(64, "largest adapter rank accepted")
    adapter_slots: int = _opt(8, "adapters held on the device at once")
    adapter_host_cache_mb: int = _opt(1024, "host memory for adapters read from disk, in MiB")
    adapter_service: bool = _opt(True, "serve loraplex.v1.AdapterService (adapter administration)")
    adapter_loader_nice: int = _opt(10, "CPU niceness (0-19) of the process reading adapters for LoadAdapter; "
                                        "higher = they yield more to decoding. Loads a request waits for run at 0")
    adapter_reads_between_steps: bool = _opt(False, "a read that a request waits for runs while decoding holds its "
                                                     "next step, not beside it (docs/operations.md: the trade-off)")
    adapter_watch_seconds: float = _opt(0.0, "look at the files of loaded adapters this often and publish a new "
                                             "version when they change (as `adapters load` does); 0 = off")
    adapter_preload: str = _opt("", "adapter ids to read and put in device slots at start-up, separated by "
                                    "','; a failing one stops the start")
    adapter_read_timeout_seconds: float = _opt(0.0, "a reader process that has not answered within this is "
                                                    "killed and replaced, and that load fails UNAVAILABLE; 0 = "
                                                    "60 s plus the largest legal adapter at 5 MB/s")
    merge_adapter: str = _opt("", "adapter id to merge into a copy of the weights at start-up, before SERVING "
                                  "(its requests then run with no LoRA work; others' keep being served)")
    merge_method: str = _opt("", "how --merge-adapter, --auto-merge and a merge request that names none merge: "
                                 "dense (merged layers in the compute dtype, equal to the adapter), requantize "
                                 "(4-bit again, PEFT's merge: keeps only part of a small update) or exact (a "
                                 "QA-LoRA adapter folded into an int4 base's zeros); empty = exact where it "
                                 "applies, else dense")
    merge_min_retained: float = _opt(0.5, "warn (log and reply) when a merge keeps less than this share of the "
                                          "adapter's update")
    auto_merge: bool = _opt(False, "merge the adapter most requests are for into a copy of the weights "
                                   "(--merge-method) "
                                   "while it dominates, and unmerge when traffic mixes again (the rule: "
                                   "server/engine/auto_merge.py)")
    auto_merge_max_wait_seconds: float = _opt(0.5, "with --auto-merge, the longest other requests wait for a step "
                                                   "while the merged adapter's run")
    native_kernels: bool = _opt(True, "the LoRA ops' C++ CPU kernels (built by make install); off = torch ops")
    lora_fused: bool = _opt(True, "on CUDA, one Triton launch per packed module for every target's LoRA; "
                                  "off = a shrink and an expand per target")
    tls_cert: str = _opt("", "PEM server certificate (chain); with --tls-key, serve over TLS")
    tls_key: str = _opt("", "PEM private key of --tls-cert")
    tls_client_ca: str = _opt("", "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)")
    auth_token: str = _opt("", "bearer token the generation service requires; empty = none")
    admin_token: str = _opt("", "bearer token the adapter service requires; empty = none")
    log_prompts: bool = _opt(False, "put prompt text in the per-request log lines (debugging only)")
    host: str = _opt("127.0.0.1", "address to listen on")
    metrics: bool = _opt(True, "serve Prometheus metrics over HTTP at /metrics")
    metrics_host: str = _opt("", "address of the metrics endpoint; empty = the same as --host")
    metrics_port: int = _opt(9477, "port of the metrics endpoint (0 = pick a free one)")
    metrics_top_adapters: int = _opt(20, "adapters with their own series in loraplex_adapter_requests_total; "
                                         "the rest count as adapter=\"other\"")
    port: int = _opt(50051, "gRPC port (0 = pick a free one)")
    http: bool = _opt(True, "serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                            "/v1/models; docs/openai.md) with the same tokens and TLS as gRPC")
    http_host: str = _opt("", "address of the HTTP API; empty = the same as --host")
    http_port: int = _opt(8000, "port of the HTTP API (0 = pick a free one)")
    grpc_workers: int = _opt(16, "threads running the RPCs' blocking work (tokenizing, request intake, adapter "
                                 "administration) off the event loop")
    threads: int = _opt(0, "torch CPU threads; 0 = torch's default")
    warmup: bool = _opt(True, "run one short generation before reporting SERVING")
    shutdown_grace_seconds: int = _opt(30, "on SIGTERM, how long running requests may take to finish")
    replicas: int = _opt(0, "0 = the engine runs in this process; N = this server is a front for N engine "
                            "replicas on Ray Serve, routed by adapter (needs loraplex[cluster]; docs/cluster.md)")
    replica_cpus: float = _opt(1.0, "CPUs each replica reserves (and its torch threads, unless --threads)")
    replica_gpus: float = _opt(0.0, "GPUs each replica reserves; 0 = one on a CUDA device (--device cuda, or "
                                    "auto with a GPU), else none")
    ray_address: str = _opt("", "Ray cluster to run the replicas on (e.g. auto); empty = start a local one on "
                                "loopback with replicas x replica-cpus CPUs")
    serve_app: str = _opt("loraplex", "name of the Serve application of the replicas; on --ray-address, one "
                                      "already running under this name (deployed from a Serve config) is used")

    def __post_init__(self):
        positive = ["quant_blocksize", "quant_group_size", "kv_cache_mb", "kv_block_size", "max_batch_size", "max_prefill_tokens",
                    "max_queue_size", "max_new_tokens", "default_max_new_tokens", "grpc_workers",
                    "max_lora_rank", "adapter_slots", "adapter_host_cache_mb", "max_message_bytes",
                    "max_concurrent_rpcs", "max_concurrent_streams", "keepalive_time_ms", "keepalive_timeout_ms",
                    "keepalive_min_ping_interval_ms"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_sequence_length", "prefill_chunk_tokens", "prefill_step_tokens", "max_step_tokens",
                     "threads", "port",
                     "shutdown_grace_seconds", "max_prompt_tokens", "metrics_port", "http_port", "metrics_top_adapters",
                     "replicas", "replica_gpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.prefill_step_tokens and self.prefill_step_tokens < self.prefill_chunk_tokens:
            raise ValueError(f"prefill_step_tokens ({self.prefill_step_tokens}) must be 0 or at least "
                             f"prefill_chunk_tokens ({self.prefill_chunk_tokens})")
        if self.max_step_tokens and not self.prefill_chunk_tokens:
            raise ValueError("max_step_tokens needs prefill_chunk_tokens (whole prompts have steps of their own)")
        if self.quant_blocksize & (self.quant_blocksize - 1) or self.quant_blocksize < 32:
            raise ValueError(f"quant_blocksize must be a power of two >= 32, got {self.quant_blocksize}")
        if self.quant not in ("nf4", "int4"):
            raise ValueError(f"quant must be nf4 or int4, got {self.quant!r}")
        if self.quant_group_size not in (32, 64, 128, 256):
            raise ValueError(f"quant_group_size must be 32, 64, 128 or 256, got {self.quant_group_size}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens")
        if not 0 <= self.adapter_loader_nice <= 19:
            raise ValueError(f"adapter_loader_nice must be within 0..19, got {self.adapter_loader_nice}")
        for name in ("adapter_watch_seconds", "adapter_read_timeout_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.merge_method not in ("", "dense", "requantize", "exact"):
            raise ValueError(f"merge_method must be dense, requantize, exact or empty, got {self.merge_method!r}")
        if self.auto_merge and not self.adapter_root_paths():
            raise ValueError("auto_merge needs adapter_roots")
        if self.auto_merge_max_wait_seconds <= 0:
            raise ValueError(f"auto_merge_max_wait_seconds must be positive, got {self.auto_merge_max_wait_seconds}")
        if self.merge_adapter and not self.adapter_root_paths():
            raise ValueError("merge_adapter needs adapter_roots")
        if self.replica_cpus <= 0:
            raise ValueError(f"replica_cpus must be positive, got {self.replica_cpus}")
        if self.adapter_preload_ids() and not self.adapter_root_paths():
            raise ValueError("adapter_preload needs adapter_roots")
        if len(self.adapter_preload_ids()) > self.adapter_slots:
            raise ValueError(f"adapter_preload names {len(self.adapter_preload_ids())} adapters but there are "
                             f"only {self.adapter_slots} adapter_slots")

    def adapter_root_paths(self) -> list[str]:
        return [p for p in self.adapter_roots.split(":") if p]

    def adapter_preload_ids(self) -> list[str]:
        return [i.strip() for i in self.adapter_preload.split(",") if i.strip()]

    def resolved_cache_dir(self) -> str:
        if self.cache_dir:
            return self.cache_dir
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "loraplex")


def environment_config() -> ServerConfig:
    """The configuration the LORAPLEX_* variables give, for tools that take no flags."""
    return config_from_args(argparse.Namespace())


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def add_config_flags(parser: argparse.ArgumentParser, cls=ServerConfig) -> None:
    """Adds one flag per dataclass field; defaults come from the environment when set."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        help_text = f"{f.metadata.get('help', '')} [env {env}, default {f.default!r}]"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {int: int, "int": int, float: float, "float": float}.get(f.type, str)
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)


def config_from_args(args: argparse.Namespace, cls=ServerConfig, environ=None):
    """Builds the config from parsed flags, falling back to LORAPLEX_* variables, then to defaults."""
    environ = os.environ if environ is None else environ
    values = {}
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        env = environ.get(ENV_PREFIX + f.name.upper())
        if given is not None:
            values[f.name] = given
        elif env is not None:
            values[f.name] = _from_env(f, env)
    return cls(**values)


def _from_env(f: dataclasses.Field, text: str):
    try:
        if f.type in (bool, "bool"):
            return _parse_bool(text)
        if f.type in (int, "int"):
            return int(text)
        if f.type in (float, "float"):
            return float(text)
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()}: {exc}") from None
    return text
