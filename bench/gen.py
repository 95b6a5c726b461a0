"""Seeded synthetic Llama checkpoints for the benchmark, written with safetensors from a config alone.

No model is instantiated: the tensor names and shapes follow ``LlamaForCausalLM`` from a LlamaConfig-shaped
dict, and each model directory gets a real ``config.json``, so transformers (and mergekit) load them as Llama
models. A *family* is a base checkpoint plus fine-tunes (base + small seeded noise), so task-vector methods
see realistic, small task vectors. Families are reused when present and complete.

    python bench/gen.py --data bench/data --family small mid
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

INIT_STD = 0.02  # Llama's initializer_range
TUNE_STD = 0.002  # fine-tune deltas, a tenth of the weights


@dataclass(frozen=True)
class Family:
    """A base model and ``tunes`` fine-tunes sharing one Llama config."""

    name: str
    config: dict[str, object]
    tunes: int
    shard_bytes: int  # models with an odd index are written in shards of this size, the others unsharded


def llama_config(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, *, tied: bool = False
) -> dict:
    """A ``config.json`` for ``LlamaForCausalLM`` in bfloat16; ``tied`` shares the embedding with the head."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": INIT_STD,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


FAMILIES = {
    # ~0.3 MB per model, for the test suite's run of the benchmark itself (tests/test_bench.py).
    "tiny": Family("tiny", llama_config(64, 160, 2, 4, 2, 512), tunes=3, shard_bytes=200_000),
    # ~0.21 GB per model.
    "small": Family("small", llama_config(768, 2048, 8, 12, 4, 32000), tunes=3, shard_bytes=100_000_000),
    # ~1.67 GB per model, close to TinyLlama's shapes with fewer layers.
    "mid": Family("mid", llama_config(2048, 5632, 16, 32, 4, 32000), tunes=3, shard_bytes=1_000_000_000),
    # ~1.4 GB per model, of which the embedding alone is 1.05 GB (a 256k vocabulary, tied to the head).
    "embed": Family(
        "embed", llama_config(2048, 5632, 4, 32, 4, 256000, tied=True), tunes=3, shard_bytes=700_000_000
    ),
}

BENCHMARKED = ("small", "mid", "embed")  # what `make bench` measures


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``LlamaForCausalLM`` for ``config``, in the order transformers saves them."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes[p + "self_attn.q_proj.weight"] = (h, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def model_bytes(config: dict) -> int:
    """Tensor bytes of one bf16 checkpoint."""
    return sum(2 * math.prod(s) for s in tensor_shapes(config).values())


def model_dirs(data: Path, family: Family) -> list[Path]:
    """``[base, tune1, ...]`` directories of a family."""
    return [
        data / family.name / "base",
        *(data / family.name / f"tune{k}" for k in range(1, family.tunes + 1)),
    ]


def _tensor(name: str, shape: tuple[int, ...], seed: int, model: int) -> torch.Tensor:
    """The base value of ``name``, plus model ``model``'s seeded delta when ``model`` > 0."""
    if name.endswith("norm.weight"):
        base = torch.ones(shape)
    else:
        g = torch.Generator().manual_seed(hash_seed(seed, name, 0))
        base = torch.randn(shape, generator=g).mul_(INIT_STD)
    if model:
        g = torch.Generator().manual_seed(hash_seed(seed, name, model))
        base.add_(torch.randn(shape, generator=g), alpha=TUNE_STD)
    return base.to(torch.bfloat16)


def hash_seed(seed: int, name: str, model: int) -> int:
    """A stable seed for (family seed, tensor, model); Python's ``hash`` is salted per process."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{name}:{model}".encode()).digest()[:7], "little")


def write_model(out: Path, family: Family, model: int, seed: int) -> None:
    """Write one checkpoint (sharded when ``model`` is odd) and its config, through a temporary directory."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = tensor_shapes(family.config)
    limit = family.shard_bytes if model % 2 else 1 << 62
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    for k, names in enumerate(groups):
        file = (
            "model.safetensors" if len(groups) == 1 else f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        )
        tensors = {n: _tensor(n, shapes[n], seed, model) for n in names}
        save_file(tensors, tmp / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": model_bytes(family.config)}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(family.config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def ensure(data: Path, name: str, seed: int = 0) -> list[Path]:
    """Make sure family ``name`` exists under ``data``; return its model directories, base first."""
    family = FAMILIES[name]
    dirs = model_dirs(data, family)
    for model, out in enumerate(dirs):
        if (out / "config.json").is_file():
            continue
        start = time.perf_counter()
        write_model(out, family, model, seed)
        print(f"generated {out} in {time.perf_counter() - start:.1f} s", flush=True)
    return dirs


def main() -> None:
    """Generate the families named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--family", nargs="+", choices=sorted(FAMILIES), default=list(BENCHMARKED))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in args.family:
        family = FAMILIES[name]
        print(f"{name}: {model_bytes(family.config) / 1e9:.2f} GB per model, {family.tunes + 1} models")
        ensure(args.data, name, args.seed)


if __name__ == "__main__":
    main()
