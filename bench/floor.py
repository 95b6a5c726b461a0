"""The floor: the least a weighted merge costs here. ``floor.py OUT.safetensors COEF:MODEL_DIR ...``

Memory-maps every input, sums ``COEF * tensor`` chunk by chunk in preallocated float32 buffers that stay in
cache, casts to bfloat16 and ``pwrite``s each chunk at its offset in a preallocated (``posix_fallocate``)
output file. One thread per core takes every n-th chunk, as hubmerge uses every core. No checks, no plan:
anything hubmerge spends beyond this is overhead.
"""

import json
import mmap
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

CHUNK = 1 << 18  # elements: 1 MiB of float32, so every buffer stays in L2
WORKERS = len(os.sched_getaffinity(0))
torch.set_num_threads(1)  # a thread per core instead: OpenMP's fork-join on every 1 MiB op costs more


def tensors(model: str) -> dict[str, torch.Tensor]:
    """Every bf16 tensor of a checkpoint directory, viewing its memory-mapped shard."""
    index = os.path.join(model, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else None
    found = {}
    for file in files or ["model.safetensors"]:
        with open(os.path.join(model, file), "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header, mm = json.loads(f.read(n)), mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        for name, t in header.items():
            if name != "__metadata__":
                begin, end = t["data_offsets"]
                view = torch.frombuffer(
                    mm, dtype=torch.bfloat16, count=(end - begin) // 2, offset=8 + n + begin
                )
                found[name] = view.view(t["shape"])
    return found


def main(out: str, pairs: list[str]) -> None:
    """Write ``sum_i coef_i * model_i`` for every tensor of the first model into ``out``."""
    coefs, models = [float(p.split(":", 1)[0]) for p in pairs], [tensors(p.split(":", 1)[1]) for p in pairs]
    header, size = {}, 0
    for name, t in models[0].items():
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [size, size + 2 * t.numel()]}
        size += 2 * t.numel()
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.posix_fallocate(fd, 0, 8 + len(text) + size)
    os.pwrite(fd, len(text).to_bytes(8, "little") + text, 0)
    chunks = [  # (tensor, first element, elements, output offset)
        (name, s, min(CHUNK, numel - s), 8 + len(text) + entry["data_offsets"][0] + 2 * s)
        for name, entry in header.items()
        for numel in [models[0][name].numel()]
        for s in range(0, numel, CHUNK)
    ]

    def work(k: int) -> None:  # torch's ops and pwrite release the GIL: the threads run in parallel
        acc, tmp, res = torch.empty(CHUNK), torch.empty(CHUNK), torch.empty(CHUNK, dtype=torch.bfloat16)
        for name, s, n, pos in chunks[k::WORKERS]:
            flat = [m[name].reshape(-1) for m in models]
            a = acc[:n].copy_(flat[0][s : s + n]).mul_(coefs[0])
            for x, c in zip(flat[1:], coefs[1:], strict=True):
                a.add_(tmp[:n].copy_(x[s : s + n]), alpha=c)
            os.pwrite(fd, res[:n].copy_(a).view(torch.uint8).numpy(), pos)

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(work, range(WORKERS)))
    os.close(fd)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
