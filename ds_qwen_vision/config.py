"""The deployment config: one JSON file (DeepSpeed style) that every process reads.

The model ranks, the gunicorn front and ``launch.sh`` all read the same file, so it is parsed in
one place.  Every section refuses unknown keys (a typo must not silently fall back to a default)
and types are strict (``"port": "8000"`` is an error, not a coercion); every problem is reported
at once with its JSON path::

    python -m ds_qwen_vision.config --config ds_config/demo.json --port 9000 --get server.port
    python -m ds_qwen_vision.config --config ds_config/demo.json --dump   # merged config, JSON

``--dump`` prints the merged config with the derived defaults filled in (served model name, IPC
socket path); ``launch.sh`` exports it as ``DSQV_CONFIG_JSON`` for the HTTP front
(`config_from_env`).  The API key itself never appears in it, only the name of its env var.

Pure stdlib + pydantic: the HTTP front imports this module and must stay free of torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEMO_MODEL = "demo"
DEMO_SERVED_NAME = "ds-qwen-vision-demo"
# Environment variables read by `config_from_env` (the gunicorn front is started without argv).
ENV_CONFIG_JSON = "DSQV_CONFIG_JSON"
ENV_CONFIG_PATH = "DSQV_CONFIG"
# sockaddr_un.sun_path is 108 bytes including the trailing NUL.
_MAX_SOCKET_PATH_BYTES = 107
# The most sequences generated together: the memory planner's cap when limits.max_concurrent is null
# (runner/memory.py; the decode graphs' largest batch and the plan header's width).
MAX_CONCURRENT = 64
# Request threads of each gunicorn worker beyond those the engine's sequences and queue can hold, so that
# /health, /metrics and /v1/models still answer while every place holds a waiting client.
SPARE_THREADS = 4


def demo_checkpoint_dir() -> str:
    """Where launch.sh builds (once) and serves the embedded demo checkpoint (checkpoint.py builds it)."""
    cache = os.environ.get("DSQV_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ds-qwen-vision")
    return os.path.join(cache, "demo-tiny-seed0")


class ConfigError(ValueError):
    """A bad deployment config; the message lists every problem with its JSON path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class TensorParallelConfig(_Section):
    tp_size: int = Field(2, ge=1)
    # Where the ranks run (see launcher.py, "Scaling out" in README). `gpus`: this host's GPU ids, as
    # nvidia-smi numbers them, one per rank (the launcher's --include localhost:2,3); None: the first
    # tp_size of CUDA_VISIBLE_DEVICES, or of all GPUs. Ignored on CPU, where the launcher starts CPU ranks.
    gpus: list[Annotated[int, Field(ge=0)]] | None = None
    # The ranks' rendezvous port (torch.distributed). None: a free port picked at each start.
    master_port: int | None = Field(None, ge=1, le=65535)
    # tp over several hosts: the deepspeed launcher's hostfile ("host slots=N" lines; the first host is
    # this one, where rank 0 and the front run). None: one host.
    hostfile: str | None = Field(None, min_length=1)

    @field_validator("gpus")
    @classmethod
    def _gpus_once_each(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("is empty (null: the first tp_size GPUs)")
            twice = sorted({g for g in v if v.count(g) > 1})
            if twice:
                raise ValueError(f"GPU {', '.join(map(str, twice))} listed twice (one rank per GPU)")
        return v

    @model_validator(mode="after")
    def _one_gpu_per_rank(self) -> TensorParallelConfig:
        if self.hostfile is not None and self.gpus is not None:
            raise ValueError("gpus and hostfile: with a hostfile, each host gives the GPUs 0..slots-1")
        if self.gpus is not None and len(self.gpus) != self.tp_size:
            raise ValueError(f"gpus lists {len(self.gpus)} GPUs but tp_size is {self.tp_size} (one rank per GPU)")
        return self


class ServerConfig(_Section):
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1)
    # Request threads per worker (gthread): a request holds one while it waits in the engine's queue or
    # generates. null: enough for limits.max_concurrent + limits.max_queue, plus SPARE_THREADS (filled in below).
    threads: int | None = Field(None, ge=1)
    timeout_s: int = Field(600, gt=0)  # gunicorn worker timeout; also the front's IPC read timeout
    ipc_socket: str | None = None  # None -> /tmp/ds-qwen-vision-{port}.sock (filled in below)
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0)
    step_timeout_s: float = Field(120.0, gt=0, allow_inf_nan=False)
    # From a rank's start to ready (loading, the memory plan, graph capture, warm-up): longer means a stuck rank
    startup_timeout_s: float = Field(1800.0, gt=0, allow_inf_nan=False)
    shutdown_grace_s: float = Field(30.0, ge=0, allow_inf_nan=False)

    @field_validator("ipc_socket")
    @classmethod
    def _socket_path_fits(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not os.path.isabs(v):
            raise ValueError("must be an absolute path (the front and the ranks run in different directories)")
        if len(os.fsencode(v)) > _MAX_SOCKET_PATH_BYTES:
            raise ValueError(f"is too long for a Unix socket path (at most {_MAX_SOCKET_PATH_BYTES} bytes)")
        return v


class LimitsConfig(_Section):
    max_images_per_request: int = Field(8, ge=0)
    max_image_pixels: int = Field(16_777_216, gt=0)
    # null: what one sequence's KV can hold beside max_new_tokens (the memory planner, runner/memory.py), up to
    # the model's positions
    max_prompt_tokens: int | None = Field(None, gt=0)
    max_new_tokens: int = Field(1024, gt=0)
    max_queue: int = Field(64, ge=1)
    # Image pixels (as processed) that queued requests may hold in host memory until they are prefilled
    # (float32 patches: 24 bytes a pixel, so the default is ~1.5 GiB); a request past it is refused (429
    # queue_full) unless nothing queued holds pixels (one request alone always fits).
    max_queued_pixels: int = Field(64 << 20, gt=0)
    # Sequences generated together (each a Gated DeltaNet state row; their KV is paged, from one pool). null:
    # the memory planner decides (their fixed state within a quarter of the cache budget, at most 64).
    max_concurrent: int | None = Field(None, ge=1, le=MAX_CONCURRENT)
    # Prompt tokens prefilled per engine step, all sequences together: a long prompt is prefilled in
    # chunks so that the sequences already generating keep getting a token every step.
    prefill_chunk_tokens: int = Field(2048, ge=16)
    # While prompts are prefilled, a running stream's gap between two tokens stays within this many
    # decode steps: warm-up times a decode step and prefill chunks and sets the prefill budget per step
    # from them (at most prefill_chunk_tokens, a multiple of 16 and with prefill graphs one graph's size;
    # aiming at 90% of the bound for the spread of step times). null: prefill_chunk_tokens.
    max_gap_steps: float | None = Field(None, gt=1, allow_inf_nan=False)
    # A step's last prefill chunk of up to 256 tokens and the decode rows in one forward, which reads the
    # weights once (runner/prefill_graphs.py, mixed_forward; not with speculative decoding). Off until a GPU
    # run has checked it against transformers and measured it: it is CPU-tested only (docs/benchmarks.md).
    mixed_prefill: bool = False
    # Choices per request (`n`): each is its own sequence, in its own cache slot.
    max_n: int = Field(4, ge=1)


class SamplingConfig(_Section):
    # A request's omitted temperature / top_p / top_k / min_p / repetition_penalty come from the checkpoint's
    # generation_config.json (as vLLM does); false: OpenAI's defaults (1, 1, off, 0, 1).
    generation_config_defaults: bool = True


class CacheConfig(_Section):
    """Device memory per rank kept across requests for multi-turn chats (0 turns a cache off). Both are
    LRU within their budget; entries are copies, so evicting one never touches a running sequence."""
    # Snapshots of prompt prefixes (GDN conv + recurrent state and the attention KV of the prefix), one per
    # prompt at the start of its generation prompt: the next turn of the chat continues from there.
    prefix_bytes: int = Field(1 << 30, ge=0)
    # The vision tower's output per image (content hash + grid): images re-sent each turn are not re-encoded.
    image_bytes: int = Field(256 << 20, ge=0)


class MemoryConfig(_Section):
    """The caches' memory (runner/memory.py): after loading and a profiling forward, every rank measures what
    its device has left; the ranks take the minimum, and this fraction of it holds the caches (prefix and
    image caches, the sequences' GDN state, KV blocks with the rest). vLLM's gpu_memory_utilization is a
    fraction of the whole card; this is of what the weights and activations leave."""
    gpu_fraction: float = Field(0.9, gt=0, le=1, allow_inf_nan=False)
    # CPU ranks: the caches' byte budget (host memory is elastic, and pages are only taken once written)
    cpu_cache_bytes: int = Field(4 << 30, gt=0)
    # Tokens per KV block: a sequence's KV is allocated in these units.
    block_size: int = Field(64, ge=16, le=1024)
    # Options that trade exactness for room (README, "Memory"): "fp8_e4m3" stores keys and values as float8
    # e4m3 with a float32 scale per vector (vLLM's --kv-cache-dtype fp8), about half the bytes a token;
    # "bfloat16" keeps the Gated DeltaNet recurrent state in bf16, half a sequence's fixed state. The
    # defaults are exact: KV in the model's dtype, the state in float32 (the checkpoint's mamba_ssm_dtype).
    kv_cache_dtype: Literal["auto", "fp8_e4m3"] = "auto"
    gdn_state_dtype: Literal["float32", "bfloat16"] = "float32"

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError("must be a power of two (the attention kernels' key tiles fall inside one block)")
        return v


class SecurityConfig(_Section):
    # The NAME of the env var holding the bearer key: the key itself never sits in a config file.
    api_key_env: str | None = Field(None, min_length=1)
    allowed_image_url_prefixes: list[str] = Field(default_factory=list)

    @field_validator("allowed_image_url_prefixes")
    @classmethod
    def _prefixes_not_empty(cls, v: list[str]) -> list[str]:
        if any(not p for p in v):
            raise ValueError("an empty prefix would allow every URL")
        return v


class SpeculativeConfig(_Section):
    """Speculative decoding (runner/speculative.py): drafts of `num_tokens` tokens per step, all verified in
    one forward. `mtp`: the checkpoint's multi-token-prediction head (refused at start on a checkpoint
    without mtp.* weights); `ngram`: prompt lookup in the sequence's own tokens."""
    method: Literal["none", "mtp", "ngram"] = "none"
    num_tokens: int = Field(3, ge=1, le=7)  # k; T = k + 1 positions per verify (decode attention takes <= 8)
    # mtp only: the head drafts over the N lowest token ids and the added tokens (mtp.DraftHead: lm_head's
    # rows read per draft fall from the whole vocabulary to N). 0: the whole vocabulary. Outputs are unchanged
    # (the verify reads the whole lm_head); acceptance may fall. Off until a GPU run shows the forced-profile
    # figure improves (benchmarks/bench_spec.py --draft-vocab).
    draft_vocab: int = Field(0, ge=0)


class AllReduceConfig(_Section):
    # The decode step's small all-reduces over peer GPU memory instead of NCCL (kernels/allreduce.py: PyTorch
    # symmetric memory, never NVLink multicast); NCCL keeps larger messages, and CPU ranks their own path.
    # Off until a 2-GPU run shows it beats NCCL in the decode step (benchmarks/allreduce_bench.py).
    peer_memory: Literal["off", "one_shot", "two_shot"] = "off"
    # Largest message (and the buffer each rank allocates): 1 MiB holds a decode step's hidden states up to
    # 102 rows (5,120 bf16 each) and the tp=2 lm_head's logits of 2 rows (248,320 bf16 each).
    max_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)

    @field_validator("max_bytes")
    @classmethod
    def _aligned(cls, v: int) -> int:
        if v % 16:
            raise ValueError("must be a multiple of 16 bytes (the kernels' vector width)")
        return v


class DeployConfig(_Section):
    model: str = Field(DEMO_MODEL, min_length=1)
    served_model_name: str | None = Field(None, min_length=1)
    tensor_parallel: TensorParallelConfig = Field(default_factory=TensorParallelConfig)
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    server: ServerConfig = Field(default_factory=ServerConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    allreduce: AllReduceConfig = Field(default_factory=AllReduceConfig)
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)

    @model_validator(mode="after")
    def _fill_derived_defaults(self) -> DeployConfig:
        # Resolved here, not at use, so that `--dump` shows (and the front receives) the values
        # that will actually be used.
        if self.served_model_name is None:
            if self.model == DEMO_MODEL:
                self.served_model_name = DEMO_SERVED_NAME
            else:
                name = os.path.basename(os.path.normpath(self.model))
                if not name or name in (".", ".."):
                    raise ValueError(f"cannot derive served_model_name from model {self.model!r}; set it")
                self.served_model_name = name
        if self.server.ipc_socket is None:
            self.server.ipc_socket = f"/tmp/ds-qwen-vision-{self.server.port}.sock"
        if self.tensor_parallel.master_port == self.server.port:
            raise ValueError(f"tensor_parallel.master_port and server.port are both {self.server.port}")
        if self.server.threads is None:
            held = self.requests_held()
            self.server.threads = -(-held // self.server.workers) + SPARE_THREADS
        return self

    @model_validator(mode="after")
    def _fields_agree(self) -> DeployConfig:
        """Settings that are each valid but cannot work together: every one found, each naming both fields."""
        problems = []
        limits, server = self.limits, self.server
        if limits.max_n > limits.max_queue:
            problems.append(
                f"limits.max_n ({limits.max_n}) is above limits.max_queue ({limits.max_queue}): each choice takes a "
                f"place in the queue, so every request with n over {limits.max_queue} would be refused (429 "
                f"queue_full); lower limits.max_n or raise limits.max_queue")
        assert server.threads is not None  # filled in above
        held, threads = self.requests_held(), server.workers * server.threads
        if threads < held:
            concurrent = (limits.max_concurrent if limits.max_concurrent is not None
                          else f"null, up to the memory planner's {MAX_CONCURRENT}")
            problems.append(
                f"server.workers x server.threads ({server.workers} x {server.threads} = {threads} request threads) is "
                f"below limits.max_concurrent ({concurrent}) + limits.max_queue ({limits.max_queue}) = {held}: the "
                f"requests past {threads} would wait inside gunicorn, where the engine's 429 queue_full never reaches "
                f"them; raise server.threads (null: sized from the limits) or lower those limits")
        if server.timeout_s < server.step_timeout_s:
            problems.append(
                f"server.timeout_s ({server.timeout_s}) is below server.step_timeout_s ({server.step_timeout_s:g}): "
                f"the front would give up on the engine (503 engine_unavailable) while a step it allows is still "
                f"running, before a hung rank is declared (503 rank_lost); raise server.timeout_s or lower "
                f"server.step_timeout_s")
        if limits.mixed_prefill and self.speculative.method != "none":
            problems.append(
                f'limits.mixed_prefill is true but speculative.method is "{self.speculative.method}": a speculative '
                f"step verifies drafts, so no step would mix a prefill chunk with decode rows; set "
                f"limits.mixed_prefill to false or speculative.method to \"none\"")
        if self.speculative.draft_vocab and self.speculative.method != "mtp":
            problems.append(
                f"speculative.draft_vocab is {self.speculative.draft_vocab} but speculative.method is "
                f"\"{self.speculative.method}\": a draft vocabulary is the MTP head's; set it to 0 or the method to \"mtp\"")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def requests_held(self) -> int:
        """Requests the engine holds at most, running or queued (n = 1 each; a request of n choices takes n
        places), each holding a request thread; limits.max_concurrent null counts as the memory planner's cap."""
        concurrent = self.limits.max_concurrent if self.limits.max_concurrent is not None else MAX_CONCURRENT
        return concurrent + self.limits.max_queue

    @property
    def is_demo(self) -> bool:
        return self.model == DEMO_MODEL

    def model_dir(self) -> str:
        """The checkpoint's directory: `model`, or the demo's cache directory."""
        return demo_checkpoint_dir() if self.is_demo else self.model

    def socket_path(self) -> str:
        assert self.server.ipc_socket is not None  # filled in by the validator
        return self.server.ipc_socket

    def api_key(self) -> str | None:
        """The bearer key from the env var named by ``security.api_key_env`` (None: no auth)."""
        name = self.security.api_key_env
        if name is None:
            return None
        # Strip: keys are often written to env files with a trailing newline.
        key = os.environ.get(name, "").strip()
        if not key:
            raise ConfigError(
                f"security.api_key_env: environment variable {name} is missing or empty "
                "(set it to the API key, or set api_key_env to null to disable authentication)"
            )
        return key


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

# CLI override name -> path of the field it sets.
_OVERRIDES: dict[str, tuple[str, ...]] = {
    "model": ("model",),
    "host": ("server", "host"),
    "port": ("server", "port"),
    "tp": ("tensor_parallel", "tp_size"),
    "gpus": ("tensor_parallel", "gpus"),
    "device": ("device",),
    "dtype": ("dtype",),
}


def _json_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        if not e["loc"] and e["type"] == "value_error":  # DeployConfig's own rules name their fields themselves
            lines += [f"  - {line}" for line in e["msg"].removeprefix("Value error, ").splitlines()]
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "model_type":
            msg = f"must be a JSON object (got {type(e['input']).__name__})"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] not in ("missing", "json_invalid") and not isinstance(e["input"], (dict, list)):
                msg += f" (got {json.dumps(e['input'], default=str)})"
        lines.append(f"  - {_json_path(e['loc'])}: {msg}")
    return f"invalid deployment config ({source}):\n" + "\n".join(lines)


def _validate(raw: Any, source: str, check_env: bool) -> DeployConfig:
    try:
        cfg = DeployConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    if check_env:
        cfg.api_key()  # fail at start, not at the first request
    return cfg


def load_config(path: str | None, overrides: dict[str, Any] | None = None, *, check_env: bool = True) -> DeployConfig:
    """Read the JSON file at ``path`` (None: all defaults), apply CLI ``overrides``, validate.

    ``overrides`` keys are ``model, host, port, tp, gpus, device, dtype``; None values are ignored.
    With ``check_env`` the API key env var (if configured) must be set.
    """
    raw: Any = {}
    source = path or "defaults"
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a JSON object, not {type(raw).__name__}")
    for name, value in (overrides or {}).items():
        if name not in _OVERRIDES:
            raise ConfigError(f"unknown override {name!r} (known: {', '.join(_OVERRIDES)})")
        if value is None:
            continue
        *parents, leaf = _OVERRIDES[name]
        node = raw
        for key in parents:
            if not isinstance(node.get(key, {}), dict):
                break  # the file has a wrong type here; validation reports it
            node = node.setdefault(key, {})
        else:
            node[leaf] = value
    return _validate(raw, source, check_env)


def load_config_json(text: str, *, source: str = "config JSON", check_env: bool = True) -> DeployConfig:
    """A config from JSON text, e.g. the output of ``--dump``."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source} is not valid JSON: {e}") from None
    return _validate(raw, source, check_env)


def config_from_env(environ: dict[str, str] | None = None) -> DeployConfig:
    """The config of the HTTP front: ``DSQV_CONFIG_JSON`` (the merged JSON that ``launch.sh``
    exports from ``--dump``) or else ``DSQV_CONFIG`` (a config file path)."""
    env = os.environ if environ is None else environ
    if env.get(ENV_CONFIG_JSON):
        return load_config_json(env[ENV_CONFIG_JSON], source=ENV_CONFIG_JSON)
    if env.get(ENV_CONFIG_PATH):
        return load_config(env[ENV_CONFIG_PATH], {})
    raise ConfigError(f"no config: set {ENV_CONFIG_JSON} (merged config JSON) or {ENV_CONFIG_PATH} (a file path)")


def _gpu_list(text: str) -> list[int]:
    try:
        return [int(g) for g in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of GPU ids, e.g. 2,3") from None


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("deployment config")
    g.add_argument("--config", metavar="FILE", help="deployment config JSON (default: all defaults)")
    g.add_argument("--model", metavar="DIR", help='checkpoint directory, or "demo"')
    g.add_argument("--host", metavar="H", help="HTTP bind host")
    g.add_argument("--port", metavar="N", type=int, help="HTTP port")
    g.add_argument("--tp", metavar="N", type=int, help="tensor-parallel size")
    g.add_argument("--gpus", metavar="IDS", type=_gpu_list, help="this host's GPU ids for the ranks, e.g. 2,3")
    g.add_argument("--device", choices=["cpu", "cuda"])
    g.add_argument("--dtype", choices=["float32", "bfloat16"])
    return parser


def config_from_args(ns: argparse.Namespace) -> DeployConfig:
    return load_config(ns.config, {name: getattr(ns, name, None) for name in _OVERRIDES})


def get_value(cfg: DeployConfig, dotted: str) -> Any:
    node: Any = cfg.model_dump(mode="json")
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise ConfigError(f"no config key {dotted!r}")
        node = node[key]
    return node


def main(argv: list[str] | None = None) -> int:
    parser = add_cli_args(argparse.ArgumentParser(
        prog="python -m ds_qwen_vision.config", description="Validate the deployment config and read values from it."))
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--get", metavar="KEY", help="print one value, e.g. server.port (strings unquoted)")
    what.add_argument("--dump", action="store_true", help="print the merged config as JSON")
    ns = parser.parse_args(argv)
    try:
        cfg = config_from_args(ns)
        if ns.dump:
            print(cfg.model_dump_json(indent=2))
        else:
            value = get_value(cfg, ns.get)
            # Strings raw so that bash can use them as they are; anything else as JSON.
            print(value if isinstance(value, str) else json.dumps(value))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
