"""Turn the benchmark's JSON results into the markdown table kept in docs/benchmarks.md."""
import json
import sys


def main(paths: list[str]) -> None:
    rows = []
    for path in paths:
        try:
            r = json.load(open(path))
        except FileNotFoundError:
            continue
        if "ranks" in r:  # the engine: one entry per rank; times are the same step, take rank 0's
            r0 = r["ranks"][0]
            how = "CUDA graphs" if r0.get("cuda_graphs") else "eager"
            rows.append((f"{r['mode']} ({how}; {r0['decode_eager_ms_per_token']:.1f} ms/token without them)",
                         r0["gpu"], r0["floor_ms"], r0["decode_ms_per_token"],
                         f"{r0['ttft_text512_ms']:.0f} (512 text) / {r0['ttft_image1024_text256_ms']:.0f} "
                         f"(image+256 = {r0['image_preprocess_ms']:.0f} processor + "
                         f"{r0['prefill_image1024_text256_ms']:.0f} prefill)",
                         f"{r0['streams_tokens_per_s']:.0f} ({r0['streams_decode_step_ms']:.1f} ms/step)",
                         "/".join(f"{x['peak_reserved_gib_8k_image']:.2f}" for x in r["ranks"]),
                         "/".join(f"{x['weights_gib']:.2f}" for x in r["ranks"])))
        else:
            streams = f"{r['streams_tokens_per_s']:.0f}" if "streams_tokens_per_s" in r else "—"
            rows.append((r["mode"], r["gpu"], r["floor_ms"], r["decode_ms_per_token"],
                         f"{r['ttft_text512_ms']:.0f} (512 text)", streams, f"{r['peak_allocated_gib']:.2f}",
                         f"{r['weights_gib']:.2f}"))
    print("| run | card | weight-read floor ms/token | decode ms/token | time to first token ms | "
          "16 streams tokens/s | peak GiB per rank | weights GiB per rank |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, gpu, floor, dec, ttft, streams, peak, w in rows:
        print(f"| {mode} | {gpu} | {floor:.1f} | {dec:.1f} | {ttft} | {streams} | {peak} | {w} |")


if __name__ == "__main__":
    main(sys.argv[1:])
