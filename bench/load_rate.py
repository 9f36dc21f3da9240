"""Start-up load rate: a 7B-VL-sized checkpoint with random bf16 weights saved to this machine's disk, loaded the
way the server loads it (`from_pretrained` with a device map: safetensors straight to the GPU) against plain
`from_pretrained` to the CPU followed by `.to("cuda")`, with the raw read speed of the same files for reference.

Run on the GPU machine; prints JSON lines (`--json PATH` also writes them). Pages of a file just written are in
the OS cache; `--drop-caches` tries to evict them (root, where the kernel allows) before each load.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import emit, write_json
from engine_throughput import TEXT_7B, VISION_7B
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration



def drop_caches(enabled: bool) -> bool:
    if not enabled:
        return False
    result = subprocess.run(["sh", "-c", "sync && echo 3 > /proc/sys/vm/drop_caches"], capture_output=True)
    return result.returncode == 0



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", type=Path, help="where to save the checkpoint (default: a temporary folder)")
    parser.add_argument("--drop-caches", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows: list[dict] = []
    folder = args.folder or Path(tempfile.mkdtemp(prefix="shizhen-7b-"))
    config = Qwen2_5_VLConfig(text_config=TEXT_7B, vision_config=VISION_7B, tie_word_embeddings=False)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    started = time.perf_counter()
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    shards = sorted(folder.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    emit(rows, {"bench": "saved", "gb": round(size / 1e9, 2), "shards": len(shards),
                "seconds": round(time.perf_counter() - started, 1), "device": torch.cuda.get_device_name()})

    cold = drop_caches(args.drop_caches)
    started = time.perf_counter()
    for shard in shards:
        with shard.open("rb") as handle:
            while handle.read(64 * 1024 * 1024):
                pass
    elapsed = time.perf_counter() - started
    emit(rows, {"bench": "raw_read", "caches_dropped": cold, "gb_per_s": round(size / elapsed / 1e9, 2)})

    for name, load in (
        ("server_path_device_map", lambda: Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder, dtype=torch.bfloat16, device_map="cuda")),
        ("plain_from_pretrained_then_to_cuda", lambda: Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder, dtype=torch.bfloat16).to("cuda")),
    ):
        cold = drop_caches(args.drop_caches)
        torch.cuda.synchronize()
        started = time.perf_counter()
        model = load()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        emit(rows, {"bench": name, "caches_dropped": cold, "seconds": round(elapsed, 2),
                    "gb_per_s": round(size / elapsed / 1e9, 2)})
        del model
        torch.cuda.empty_cache()
    write_json(rows, args.json)


if __name__ == "__main__":
    sys.exit(main())
