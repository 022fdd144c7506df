"""One rank of the loading-memory test: host RSS growth while loading vs this rank's shard size."""
import json
import sys

import torch

from ds_qwen_vision.model import init_distributed, load_model


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def main(model_dir: str, warmup_dir: str, out: str) -> None:
    rank, world = init_distributed("cpu")
    # Load a tiny checkpoint first so imports, process groups and DeepSpeed's one-time setup are in place
    # (a server has them before it loads anyway); then reset the peak so only loading the weights counts.
    load_model(warmup_dir, world, "cpu", torch.float32, show_progress=False)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS") * 1024
    model = load_model(model_dir, world, "cpu", torch.float32, show_progress=False)
    peak = status_kib("VmHWM") * 1024
    shard = sum(p.numel() * p.element_size() for p in model.parameters())
    with open("/proc/self/status") as f:
        detail = {k: v for k, v in (line.split(":", 1) for line in f) if k in ("RssAnon", "RssFile", "RssShmem")}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"rss_before": before, "rss_peak": peak, "shard_bytes": shard,
                   "after": {k: v.strip() for k, v in detail.items()}}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
