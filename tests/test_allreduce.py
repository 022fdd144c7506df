"""The peer-memory all-reduce (kernels/allreduce.py): which messages take it, its config key, and that with
the key on, CPU ranks keep DeepSpeed's own all-reduce for every call and answer exactly as before.

The peer path itself needs GPUs: benchmarks/allreduce_bench.py checks it against NCCL on 2 GPUs.
"""
import json
from pathlib import Path

import pytest
import torch
from ranks import launch
from transformers import Qwen3_5ForConditionalGeneration

from ds_qwen_vision.config import ConfigError, load_config
from ds_qwen_vision.kernels.allreduce import PeerAllReduce, refusal
from ds_qwen_vision.model import chat_inputs, load_processor

pytestmark = pytest.mark.slow  # multi-process (pyproject.toml: the fast tier runs -m "not slow")

HIDDEN, VOCAB = 5120, 248_320  # the 27B's hidden size and vocabulary (the tp=2 lm_head all-reduces full logits)
MiB = 1 << 20


def msg(*shape, dtype=torch.bfloat16):
    """A message with the layout a CUDA tensor would have, without a GPU (meta: no data)."""
    return torch.empty(*shape, dtype=dtype, device="meta")


def why(t, world=2, mode="one_shot", max_bytes=MiB):
    return refusal(t, world=world, mode=mode, max_bytes=max_bytes, device_type="meta")


@pytest.mark.parametrize("rows", [1, 2, 4, 8, 16, 64])
@pytest.mark.parametrize("mode", ["one_shot", "two_shot"])
def test_decode_messages_take_the_peer_path(rows, mode):
    assert why(msg(rows, 1, HIDDEN), mode=mode) is None  # the layers' outputs [batch, 1, hidden]
    assert why(msg(rows, 1, HIDDEN, dtype=torch.float32), mode=mode, max_bytes=2 * MiB) is None
    assert why(msg(1, 1, VOCAB)) is None  # the lm_head's logits of one row: 485 KiB


@pytest.mark.parametrize("t, world, mode, expected", [
    (msg(2048, HIDDEN), 2, "one_shot", "larger than max_bytes"),     # a prefill chunk: NCCL
    (msg(16, 1, VOCAB), 2, "one_shot", "larger than max_bytes"),     # 16 rows of logits: 7.6 MiB
    (msg(1, HIDDEN, dtype=torch.float16), 2, "one_shot", "dtype"),   # the kernels have no fp16
    (msg(1, HIDDEN, dtype=torch.int64), 2, "one_shot", "dtype"),
    (msg(64, 80).t(), 2, "one_shot", "not contiguous"),
    (msg(HIDDEN + 8)[1:], 2, "one_shot", "misaligned"),             # offset of 2 bytes
    (msg(3), 2, "one_shot", "misaligned"),                           # 6 bytes
    (msg(0), 2, "one_shot", "empty"),
    (msg(1, HIDDEN), 1, "one_shot", "tp=1"),
    (msg(1, HIDDEN), 16, "one_shot", "tp=16"),
    (msg(1, HIDDEN), 6, "two_shot", "two_shot at tp=6"),
    (msg(1, HIDDEN), 2, "off", "off"),
])
def test_fallback(t, world, mode, expected):
    assert expected in why(t, world, mode)


def test_exact_limits():
    assert why(msg(MiB // 2)) is None                 # exactly max_bytes
    assert "larger" in why(msg(MiB // 2 + 8))
    assert why(msg(HIDDEN + 8)[8:]) is None           # a 16-byte offset is aligned
    assert why(msg(1, HIDDEN), world=6) is None       # one_shot has a kernel for any tp 2..8
    assert why(msg(1, HIDDEN), world=8, mode="two_shot") is None


def test_cpu_and_cuda_tensors():
    cpu = torch.zeros(1, HIDDEN, dtype=torch.bfloat16)
    assert refusal(cpu, world=2, mode="one_shot", max_bytes=MiB) == "not a CUDA tensor"


def test_hook_hands_other_calls_to_the_original():
    from deepspeed.comm import ReduceOp

    calls, group = [], object()

    def original(tensor, op, group):
        calls.append((tensor, op, group))
        return tensor

    hook = PeerAllReduce(original, group, world=2, mode="one_shot", max_bytes=MiB)
    x = torch.ones(4, HIDDEN)
    assert hook(x, ReduceOp.SUM, group) is x                     # a CPU tensor
    hook(x, ReduceOp.SUM, None)                                  # not the TP group
    hook(x, ReduceOp.MAX, group)
    hook(x, torch.distributed.ReduceOp.MAX, group)
    assert [c[0] is x for c in calls] == [True] * 4
    assert [c[2] for c in calls] == [group, None, group, group]
    assert hook.counts == {"not a CUDA tensor": 1, "another process group": 1, "not a sum": 2}
    assert torch.equal(x, torch.ones(4, HIDDEN))


def test_the_torch_api_it_calls():
    """What kernels/allreduce.py calls of torch's symmetric memory, as this torch defines it (no GPU needed;
    the GPU host's torch is checked again at install, which refuses the path when an op is missing)."""
    import torch.distributed._symmetric_memory as symm_mem
    from torch._C._distributed_c10d import _SymmetricMemory

    for name in ("empty", "rendezvous", "get_backend", "set_backend"):
        assert callable(getattr(symm_mem, name)), name
    assert isinstance(_SymmetricMemory.multicast_ptr, property)  # read as an attribute of the handle
    ops = torch.ops.symm_mem
    assert [a.name for a in ops.one_shot_all_reduce_copy_out.default._schema.arguments] == \
        ["symm_buffer", "local_input", "reduce_op", "group_name", "out"]
    assert [a.name for a in ops.two_shot_all_reduce_out.default._schema.arguments] == \
        ["input", "reduce_op", "group_name", "output"]
    # The calls as PeerAllReduce.reduce_ makes them bind to the schemas: what fails is the missing Meta kernel.
    symm, flat = msg(HIDDEN), msg(HIDDEN)
    for call in (lambda: ops.one_shot_all_reduce_copy_out(symm, flat, "sum", "0", flat),
                 lambda: ops.two_shot_all_reduce_out(symm, "sum", "0", flat)):
        with pytest.raises(NotImplementedError, match="Meta"):
            call()


def test_config_key(tmp_path):
    cfg = load_config(None, {})
    assert (cfg.allreduce.peer_memory, cfg.allreduce.max_bytes) == ("off", MiB)  # off by default
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"allreduce": {"peer_memory": "two_shot", "max_bytes": 4 * MiB}}))
    assert load_config(str(p), {}).allreduce.model_dump() == {"peer_memory": "two_shot", "max_bytes": 4 * MiB}
    p.write_text(json.dumps({"allreduce": {"peer_memory": "multimem", "max_bytes": 1000, "bytes": 1}}))
    with pytest.raises(ConfigError) as e:
        load_config(str(p), {})
    msg_ = str(e.value)
    assert "allreduce.peer_memory: Input should be 'off', 'one_shot' or 'two_shot'" in msg_
    assert "allreduce.max_bytes: Input should be greater than or equal to 1024" in msg_
    assert "allreduce.bytes: unknown key" in msg_
    for bad, text in [(1032, "multiple of 16"), (128 * MiB, "less than or equal"), ("1048576", "valid integer"),
                      (True, "valid integer")]:
        p.write_text(json.dumps({"allreduce": {"max_bytes": bad}}))
        with pytest.raises(ConfigError, match=f"allreduce.max_bytes: .*{text}"):
            load_config(str(p), {})


NEW_TOKENS = 8
MESSAGES = [{"role": "user", "content": "Tell me a story about the sea."}]


def test_cpu_ranks_keep_their_all_reduce(tiny_ckpt, tmp_path):
    """tp=2 CPU ranks with peer_memory on: every all-reduce falls back, answers equal transformers' own."""
    spec = {"model": tiny_ckpt, "messages": MESSAGES, "new_tokens": NEW_TOKENS, "out": str(tmp_path),
            "peer_memory": "one_shot"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    launch(2, [str(Path(__file__).parent / "allreduce_worker.py"), str(tmp_path / "spec.json")])

    model = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    inputs = chat_inputs(load_processor(tiny_ckpt), MESSAGES, [])
    with torch.inference_mode():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    # Per forward: 2 row-parallel layers per decoder layer, the embedding and the lm_head; forwards: the
    # transformers call, the prefill, NEW_TOKENS - 1 decodes.
    per_forward = 2 * model.config.text_config.num_hidden_layers + 2
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["hooked"], "the runner did not install the hook"
        assert got["counts"] == {"not a CUDA tensor": per_forward * (NEW_TOKENS + 1)}
        rel = ((got["logits"] - logits).norm() / logits.norm()).item()
        assert rel <= 1e-5, f"rank {r}: prefill logits relative error {rel:.2e}"
        assert got["tokens"] == tokens.tolist(), f"rank {r}: greedy tokens differ"
