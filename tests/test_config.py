"""The deployment config: defaults, shipped files, every bad value reported with its path, the CLI."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_qwen_vision.config import (ConfigError, DeployConfig, add_cli_args, config_from_args, config_from_env,
                                   load_config, load_config_json, main)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "ds_config" / "demo.json"
QWEN_27B = REPO / "ds_config" / "qwen3.6-27b-2gpu.json"


def write(tmp_path, obj) -> str:
    p = tmp_path / "cfg.json"
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


def test_defaults():
    cfg = load_config(None, {})
    assert cfg.model == "demo" and cfg.is_demo
    assert cfg.served_model_name == "ds-qwen-vision-demo"
    assert cfg.tensor_parallel.tp_size == 2
    assert (cfg.dtype, cfg.device) == ("float32", "cpu")
    s = cfg.server
    # threads null: one per request the engine can hold (64 sequences, the planner's cap, + 64 queued) + 4 spare
    assert (s.host, s.port, s.workers, s.threads, s.timeout_s) == ("127.0.0.1", 8000, 1, 132, 600)
    assert (s.max_body_bytes, s.step_timeout_s, s.shutdown_grace_s) == (20 * 1024 * 1024, 120, 30)
    assert cfg.socket_path() == "/tmp/ds-qwen-vision-8000.sock"
    lim = cfg.limits
    assert (lim.max_images_per_request, lim.max_image_pixels, lim.max_prompt_tokens, lim.max_new_tokens,
            lim.max_queue) == (8, 16_777_216, None, 1024, 64)
    assert lim.max_concurrent is None  # both null: the memory planner decides (runner/memory.py)
    assert (cfg.memory.gpu_fraction, cfg.memory.cpu_cache_bytes, cfg.memory.block_size) == (0.9, 4 << 30, 64)
    assert cfg.security.api_key_env is None and cfg.api_key() is None
    assert cfg.security.allowed_image_url_prefixes == []
    assert (cfg.cache.prefix_bytes, cfg.cache.image_bytes) == (1 << 30, 256 << 20)


def test_demo_file_is_the_defaults():
    assert load_config(str(DEMO), {}) == load_config(None, {})


def test_qwen_27b_file(monkeypatch):
    monkeypatch.setenv("DSQV_API_KEY", "sk-test\n")
    cfg = load_config(str(QWEN_27B), {})
    assert cfg.model == "/models/Qwen3.6-27B" and cfg.served_model_name == "Qwen3.6-27B"
    assert (cfg.tensor_parallel.tp_size, cfg.device, cfg.dtype) == (2, "cuda", "bfloat16")
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8000)
    assert (cfg.limits.max_prompt_tokens, cfg.limits.max_new_tokens, cfg.limits.max_concurrent) == (None, 2048, None)
    assert cfg.api_key() == "sk-test"  # trailing newline of an env file stripped


@pytest.mark.parametrize("value", [None, "", "  "])
def test_missing_api_key_env_fails_at_start(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("DSQV_API_KEY", raising=False)
    else:
        monkeypatch.setenv("DSQV_API_KEY", value)
    with pytest.raises(ConfigError, match="security.api_key_env: environment variable DSQV_API_KEY is missing"):
        load_config(str(QWEN_27B), {})
    # Tools that only read settings may skip the check.
    assert load_config(str(QWEN_27B), {}, check_env=False).security.api_key_env == "DSQV_API_KEY"


def test_every_problem_is_listed_with_its_path(tmp_path):
    path = write(tmp_path, {
        "modle": "x",
        "dtype": "fp16",
        "tensor_parallel": {"tp_size": 0},
        "server": {"port": 70000, "prot": 1, "step_timeout_s": -1, "workers": "2"},
        "limits": {"max_new_tokens": 1.5},
        "security": {"allowed_image_url_prefixes": ["https://ok/", ""]},
    })
    with pytest.raises(ConfigError) as e:
        load_config(path, {})
    msg = str(e.value)
    for expected in [
        "modle: unknown key",
        "dtype: Input should be 'float32' or 'bfloat16' (got \"fp16\")",
        "tensor_parallel.tp_size: Input should be greater than or equal to 1 (got 0)",
        "server.port: Input should be less than or equal to 65535 (got 70000)",
        "server.prot: unknown key",
        "server.step_timeout_s: Input should be greater than 0 (got -1)",
        "server.workers: Input should be a valid integer (got \"2\")",  # strict: no string coercion
        "limits.max_new_tokens: Input should be a valid integer",
        "security.allowed_image_url_prefixes: an empty prefix would allow every URL",
    ]:
        assert expected in msg, msg
    assert msg.startswith(f"invalid deployment config ({path}):")


@pytest.mark.parametrize("raw, expected", [
    ({"server": []}, "server: must be a JSON object (got list)"),
    ({"server": {"ipc_socket": "rel/path.sock"}}, "server.ipc_socket: must be an absolute path"),
    ({"server": {"ipc_socket": "/tmp/" + "x" * 120}}, "too long for a Unix socket path"),
    ({"server": {"step_timeout_s": float("nan")}}, "server.step_timeout_s: Input should be a finite number"),
    ({"server": {"shutdown_grace_s": 0, "timeout_s": 0}}, "server.timeout_s: Input should be greater than 0"),
    ({"limits": {"max_queue": 0}}, "limits.max_queue: Input should be greater than or equal to 1"),
    ({"device": "tpu"}, "device: Input should be 'cpu' or 'cuda'"),
    ({"model": "/"}, "cannot derive served_model_name from model '/'"),
    ({"served_model_name": ""}, "served_model_name: String should have at least 1 character"),
    ({"security": {"api_key_env": ""}}, "security.api_key_env: String should have at least 1 character"),
    ({"tensor_parallel": {"tp_size": True}}, "tensor_parallel.tp_size: Input should be a valid integer"),
    ({"cache": {"prefix_bytes": -1}}, "cache.prefix_bytes: Input should be greater than or equal to 0"),
    ({"cache": {"image_bytes": "1G"}}, "cache.image_bytes: Input should be a valid integer"),
    ({"cache": {"prefix_gb": 1}}, "cache.prefix_gb: unknown key"),
])
def test_bad_values(tmp_path, raw, expected):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(write(tmp_path, raw), {})
    assert expected in str(e.value)


@pytest.mark.parametrize("text, expected", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, not list"),
])
def test_unreadable_files(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text), {})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.json"):
        load_config(str(tmp_path / "nope.json"), {})


def test_overrides(tmp_path):
    cfg = load_config(str(DEMO), {"model": "/ckpt/Qwen3.6-35B-A3B/", "host": "0.0.0.0", "port": 9001, "tp": 4,
                                  "device": "cuda", "dtype": "bfloat16"})
    assert cfg.model == "/ckpt/Qwen3.6-35B-A3B/"
    assert cfg.served_model_name == "Qwen3.6-35B-A3B"  # derived after the override
    assert (cfg.server.host, cfg.server.port, cfg.tensor_parallel.tp_size) == ("0.0.0.0", 9001, 4)
    assert (cfg.device, cfg.dtype) == ("cuda", "bfloat16")
    assert cfg.socket_path() == "/tmp/ds-qwen-vision-9001.sock"
    # None means "not given on the command line".
    assert load_config(str(DEMO), {"port": None, "model": None}) == load_config(None, {})
    # An explicit socket or name in the file wins over the derived default.
    path = write(tmp_path, {"served_model_name": "mine", "server": {"ipc_socket": "/run/x.sock"}})
    cfg = load_config(path, {"port": 1234, "model": "/m/other"})
    assert (cfg.served_model_name, cfg.socket_path()) == ("mine", "/run/x.sock")


def test_override_values_are_validated():
    with pytest.raises(ConfigError, match="server.port: Input should be greater than or equal to 1 .got 0."):
        load_config(None, {"port": 0})
    with pytest.raises(ConfigError, match="unknown override 'replicas'"):
        load_config(None, {"replicas": 2})


def test_cli_args():
    parser = add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--config", str(DEMO), "--tp", "1", "--port", "8123", "--dtype", "bfloat16"])
    cfg = config_from_args(ns)
    assert (cfg.tensor_parallel.tp_size, cfg.server.port, cfg.dtype) == (1, 8123, "bfloat16")
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "tpu"])


def test_main_get_and_dump(capsys, monkeypatch):
    assert main(["--config", str(DEMO), "--port", "9002", "--get", "server.port"]) == 0
    assert capsys.readouterr().out == "9002\n"
    assert main(["--config", str(DEMO), "--get", "served_model_name"]) == 0
    assert capsys.readouterr().out == "ds-qwen-vision-demo\n"  # strings unquoted, for bash
    assert main(["--get", "security.api_key_env"]) == 0
    assert capsys.readouterr().out == "null\n"
    assert main(["--config", str(DEMO), "--get", "limits"]) == 0
    assert json.loads(capsys.readouterr().out)["max_queue"] == 64

    assert main(["--config", str(DEMO), "--model", "/m/Qwen3.6-27B", "--dump"]) == 0
    dumped = capsys.readouterr().out
    # The dump is what launch.sh exports to the front: it must load back to the same config.
    monkeypatch.setenv("DSQV_CONFIG_JSON", dumped)
    assert config_from_env() == load_config(str(DEMO), {"model": "/m/Qwen3.6-27B"})
    assert load_config_json(dumped).served_model_name == "Qwen3.6-27B"


def test_main_errors(capsys, tmp_path):
    assert main(["--config", write(tmp_path, {"server": {"port": "x"}}), "--dump"]) == 2
    err = capsys.readouterr()
    assert err.out == "" and "server.port: Input should be a valid integer" in err.err
    assert main(["--get", "server.nope"]) == 2
    assert "no config key 'server.nope'" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    """launch.sh runs ``python -m ds_qwen_vision.config``: exit 2 and stderr for a bad config."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "ds_qwen_vision.config", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    ok = run("--config", str(DEMO), "--tp", "1", "--get", "tensor_parallel.tp_size")
    assert (ok.returncode, ok.stdout) == (0, "1\n")
    bad = run("--config", write(tmp_path, {"limits": {"max_queue": -1}}), "--dump")
    assert bad.returncode == 2 and bad.stdout == ""
    assert "limits.max_queue: Input should be greater than or equal to 1 (got -1)" in bad.stderr


# Each rule: a config that breaks it, and the two fields its message must name (both JSON paths).
CROSS_FIELD = {
    "max_n over max_queue": ({"limits": {"max_n": 8, "max_queue": 4}},
                             "limits.max_n (8) is above limits.max_queue (4)"),
    "threads under concurrent + queue": ({"server": {"threads": 8}, "limits": {"max_concurrent": 1, "max_queue": 8}},
                                         "server.workers x server.threads (1 x 8 = 8 request threads) is below "
                                         "limits.max_concurrent (1) + limits.max_queue (8) = 9"),
    "threads under the planner's 64 + queue": ({"server": {"workers": 2, "threads": 16}},
                                               "server.workers x server.threads (2 x 16 = 32 request threads) is below "
                                               "limits.max_concurrent (null, up to the memory planner's 64) + "
                                               "limits.max_queue (64) = 128"),
    "timeout under step timeout": ({"server": {"timeout_s": 60, "step_timeout_s": 120}},
                                   "server.timeout_s (60) is below server.step_timeout_s (120)"),
    "mixed prefill under speculation": ({"limits": {"mixed_prefill": True}, "speculative": {"method": "ngram"}},
                                        'limits.mixed_prefill is true but speculative.method is "ngram"'),
}


@pytest.mark.parametrize("name", CROSS_FIELD)
def test_fields_that_cannot_work_together(tmp_path, name):
    raw, expected = CROSS_FIELD[name]
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, raw), {})
    assert f"\n  - {expected}" in str(e.value), str(e.value)  # a line of its own, no "(top level)" prefix
    assert str(e.value).count("\n  - ") == 1  # this rule alone


def test_every_cross_field_problem_at_once(tmp_path):
    raw = {"server": {"threads": 1, "timeout_s": 10, "step_timeout_s": 20},
           "limits": {"max_n": 8, "max_queue": 4, "mixed_prefill": True}, "speculative": {"method": "mtp"}}
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, raw), {})
    lines = str(e.value).splitlines()[1:]
    assert [line.split(" (")[0] for line in lines] == [
        "  - limits.max_n", "  - server.workers x server.threads", "  - server.timeout_s",
        "  - limits.mixed_prefill is true but speculative.method is \"mtp\": a speculative step verifies drafts, so "
        "no step would mix a prefill chunk with decode rows; set limits.mixed_prefill to false or speculative.method "
        "to \"none\""]


def test_threads_default_to_what_the_limits_hold(tmp_path):
    cfg = load_config(write(tmp_path, {"server": {"workers": 2}, "limits": {"max_concurrent": 4, "max_queue": 9}}), {})
    assert cfg.server.threads == 7 + 4  # ceil(13 / 2) per worker, + 4 spare for /health and /metrics
    assert cfg.server.workers * cfg.server.threads >= cfg.limits.max_concurrent + cfg.limits.max_queue
    # the boundaries themselves are fine: threads == concurrent + queue, n == queue, timeout == step timeout
    edge = {"server": {"threads": 13, "timeout_s": 120, "step_timeout_s": 120},
            "limits": {"max_concurrent": 4, "max_queue": 9, "max_n": 9}}
    assert load_config(write(tmp_path, edge), {}).server.threads == 13


def test_test_configs_are_consistent():
    """The configs the tests start servers with pass the cross-field rules too."""
    from conftest import HARDENED_CONFIG
    from test_load import CONFIG as LOAD_CONFIG

    for raw in (HARDENED_CONFIG, LOAD_CONFIG):
        load_config_json(json.dumps(raw), check_env=False)


def test_cross_field_refusal_exits_2(tmp_path):
    """launch.sh refuses such a config at start: ``python -m ds_qwen_vision.config`` exits 2 naming both fields."""
    bad = subprocess.run([sys.executable, "-m", "ds_qwen_vision.config", "--config",
                          write(tmp_path, {"limits": {"max_n": 8, "max_queue": 4}}), "--dump"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "limits.max_n (8) is above limits.max_queue (4)" in bad.stderr


def test_config_from_env(tmp_path):
    with pytest.raises(ConfigError, match="set DSQV_CONFIG_JSON"):
        config_from_env({})
    assert config_from_env({"DSQV_CONFIG": str(DEMO)}) == load_config(None, {})
    with pytest.raises(ConfigError, match="DSQV_CONFIG_JSON is not valid JSON"):
        config_from_env({"DSQV_CONFIG_JSON": "{"})
    with pytest.raises(ConfigError, match="DSQV_CONFIG_JSON.*\n  - bogus: unknown key"):
        config_from_env({"DSQV_CONFIG_JSON": '{"bogus": 1}'})


def test_secret_never_in_dump(monkeypatch):
    monkeypatch.setenv("DSQV_API_KEY", "sk-very-secret")
    cfg = load_config(str(QWEN_27B), {})
    assert "sk-very-secret" not in cfg.model_dump_json()
    assert isinstance(cfg, DeployConfig) and os.environ["DSQV_API_KEY"] == "sk-very-secret"
