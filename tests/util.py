"""Helpers for tests: tiny real safetensors checkpoints on disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_model(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    config: dict[str, object] | None = None,
    card: str | None = None,
) -> Path:
    """Write ``tensors`` as a real checkpoint: one model.safetensors, or ``shards`` files plus an index."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for s in range(shards):
            part = names[s * per : (s + 1) * per]
            filename = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(directory / filename), metadata={"format": "pt"})
            weight_map |= {n: filename for n in part}
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = (
        config
        if config is not None
        else {"architectures": ["TinyModel"], "model_type": "tiny", "dtype": "float32"}
    )
    (directory / "config.json").write_text(json.dumps(cfg))
    if card is not None:
        (directory / "README.md").write_text(card)
    return directory


def random_tensors(seed: int, *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A small model-like state dict: matrices, a vector, a scalar-ish tensor and an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(16, 8, generator=g).to(dtype),
        "layer.0.weight": torch.randn(8, 8, generator=g).to(dtype),
        "layer.0.bias": torch.randn(8, generator=g).to(dtype),
        "layer.1.weight": torch.randn(8, 8, generator=g).to(dtype),
        "norm.weight": torch.randn(8, generator=g).to(dtype),
        "head.weight": torch.randn(3, 8, generator=g).to(dtype),
        "position_ids": torch.arange(16).unsqueeze(0),
    }


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def tiny_llama(seed: int, directory: Path, *, shard: str | None = None, card: str | None = None) -> Path:
    """A real (tiny, random) Llama causal LM with tied embeddings, saved with save_pretrained."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    kwargs = {"max_shard_size": shard} if shard else {}
    transformers.LlamaForCausalLM(config).save_pretrained(directory, **kwargs)
    transformers.GenerationConfig(max_new_tokens=4).save_pretrained(directory)
    if card is not None:
        (directory / "README.md").write_text(card)
    return directory


_KILL_AFTER = """
import os, signal, sys
{prelude}
import hubmerge.writer as w
count = 0
original = w.ShardWriter.tensor_done
def tensor_done(self, job):
    global count
    original(self, job)
    count += 1
    if count == int(sys.argv[2]):
        os.kill(os.getpid(), signal.{signal})
w.ShardWriter.tensor_done = tensor_done
from hubmerge.cli import main
sys.exit(main([sys.argv[1], "--out", sys.argv[3], "-q"] + sys.argv[4:]))
"""


def kill_after_script(prelude: str = "", signal: str = "SIGKILL") -> str:
    """A ``python -c`` script: ``RECIPE N OUT [ARGS]`` merges and sends itself ``signal`` after N finished
    tensors (from the writer's thread, as another process's signal may come at any moment).

    Args:
        prelude: statements run first (for example, module settings to change).
        signal: the signal's name in the ``signal`` module.
    """
    return _KILL_AFTER.format(prelude=prelude, signal=signal)


def default_sigint() -> None:
    """For ``preexec_fn``: SIGINT back to its default in the child, so Python turns it into KeyboardInterrupt
    (a job a shell starts in the background begins with SIGINT ignored, and ignored it would stay)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
