"""Config, generation and tokenizer files: copied from the base model (else the first model) into the output.

``config.json`` gets the output dtype; sentence-transformers module configs come along so the merge loads with
sentence-transformers too. Weight files are never copied: every weight in the output is planned and merged.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import PlanError
from .sources import TensorSource

log = logging.getLogger(__name__)

COMPANION_GLOBS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
    "preprocessor_config.json",
    "processor_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot")


def companion_source(sources: Sequence[TensorSource], n_models: int, has_base: bool) -> TensorSource:
    """The source companions come from: the base model if the recipe has one, else the first model."""
    return sources[n_models] if has_base else sources[0]


def companion_files(source: TensorSource) -> list[str]:
    """Relative paths of the companion files ``source`` has, in a stable order."""
    files = source.files()
    chosen = [f for f in files if "/" not in f and any(fnmatch.fnmatchcase(f, g) for g in COMPANION_GLOBS)]
    if any(f.endswith(".py") and "/" not in f for f in files) and _has_custom_code(source, files):
        chosen += [f for f in files if f.endswith(".py") and "/" not in f]  # auto_map's modules and theirs
    if "modules.json" in files:
        for module_dir in _module_dirs(source):
            for f in files:
                if f.startswith(module_dir + "/") and not f.endswith(WEIGHT_SUFFIXES):
                    chosen.append(f)  # a module's weights are refused before merging: check_module_weights
    return sorted(f for f in set(chosen) if not f.endswith(WEIGHT_SUFFIXES))


def _has_custom_code(source: TensorSource, files: Sequence[str]) -> bool:
    """Whether the model's config (or its tokenizer's) maps classes to code of its own (``auto_map``), which
    ``trust_remote_code`` loads from the model's ``.py`` files: the output needs them too."""
    for name in ("config.json", "tokenizer_config.json"):
        path = source.fetch(name) if name in files else None
        config = read_config(path) if path is not None else None
        if config is not None and config.get("auto_map"):
            return True
    return False


def check_module_weights(source: TensorSource) -> None:
    """Refuse a sentence-transformers model whose modules (a ``2_Dense``, say) hold weights of their own.

    Those weights are not in the checkpoint the merge reads, and a merge without them would not load with
    sentence-transformers; the pooling and normalising modules have none and come along as files.

    Raises:
        PlanError: naming the module's weight file, before any weight is read.
    """
    files = source.files()
    if "modules.json" not in files:
        return
    for module_dir in _module_dirs(source):
        held = sorted(f for f in files if f.startswith(module_dir + "/") and f.endswith(WEIGHT_SUFFIXES))
        if held:
            raise PlanError(
                f"{source.label}: the sentence-transformers module {module_dir} has weights of its own "
                f"({held[0]}), which hubmerge does not merge; the merge would not load without them",
                hint=f"merge the {module_dir} folders of the models with a recipe of their own (each is a "
                f"checkpoint) and put the result in the output's {module_dir}/, or drop the module from "
                "modules.json",
            )


# A LoRA factor's name: PEFT's (lora_A/lora_B), diffusers' (lora.down/lora.up, lora_down/lora_up).
_LORA = re.compile(r"(?:^|[._])lora(?:_[AB]|_embedding_[AB]|_magnitude_vector|[._](?:down|up))(?:[._]|$)")


def check_not_adapter(source: TensorSource) -> None:
    """Refuse a PEFT adapter (LoRA, IA3, LoHa, ...): hubmerge merges whole checkpoints.

    Averaging LoRA's A and B factors one by one is not the average of the updates B @ A, and the output
    would load neither as a model nor as an adapter. An adapter is known by the file its weights are read
    from, PEFT's ``adapter_model.safetensors``, or by holding LoRA factors only (a model that stores LoRA
    tensors of its own beside its weights, as some multimodal ones do, is a model).

    Raises:
        PlanError: naming the model and the adapter's file, before any weight is read.
    """
    read = {PurePosixPath(info.file).name for info in source.tensors.values()}
    found = next((name for name in sorted(read) if name.startswith("adapter_model")), None)
    if found is None and source.tensors and all(_LORA.search(name) for name in source.tensors):
        found = next(iter(sorted(read)))  # LoRA factors only, by another name (diffusers' LoRA files)
    if found is None:  # the weights read are a model's (a folder may hold an adapter's files beside them)
        return
    raise PlanError(
        f"{source.label} ({source.ref}) is a PEFT adapter ({found}), not a model checkpoint: merging its "
        "tensors one by one (LoRA's A and B factors) would not merge the updates",
        hint="merge the adapter into its base model first (peft: PeftModel.from_pretrained(base, adapter)"
        ".merge_and_unload().save_pretrained(dir)), then merge those folders",
    )


# Tensors that quantized checkpoints store beside their packed weights: FP8 scales (DeepSeek, compressed-
# tensors), GPTQ/AWQ's packed ints and zero points, bitsandbytes' absmax and quant state.
_QUANT_SIDE = re.compile(
    r"(?:^|\.)(?:weight_scale_inv|weight_scale|input_scale|qweight|qzeros|scales|g_idx|absmax|quant_map|SCB"
    r"|weight_packed|weight_zero_point)$|\.quant_state\."
)
_PACKED = ("F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I8", "U8", "I32", "F4")


def check_not_quantized(source: TensorSource) -> None:
    """Refuse a quantized checkpoint (FP8 with scales, GPTQ, AWQ, bitsandbytes): what it stores are codes and
    scales, not the weights, so merging them entry by entry (codes with codes, scales with scales) gives
    neither the merged weights nor a model that loads as one.

    Known by a quantizer's side tensor (``proj.weight_scale_inv``, ``qzeros``, ``absmax``...) beside weights
    stored in a packed or 8-bit type; a model whose float weights merely have such a name is a model.

    Raises:
        PlanError: naming the model and one such tensor, before any weight is read.
    """
    sides = [name for name in sorted(source.tensors) if _QUANT_SIDE.search(name)]
    packed = next(
        (
            i
            for name, i in sorted(source.tensors.items())
            if i.dtype in _PACKED and name.endswith(("weight", "weight_packed"))
        ),
        None,
    )
    if not sides or packed is None:
        return
    side = next((name for name in sides if name != packed.name), sides[0])  # qweight is both: name another
    raise PlanError(
        f"{source.label} ({source.ref}) is a quantized checkpoint: {side} beside {packed.name} stored as "
        f"{packed.dtype}; merging codes and scales entry by entry does not merge the weights",
        hint="merge the unquantized checkpoints (bfloat16 or float16), then quantize the merge",
    )


def _module_dirs(source: TensorSource) -> list[str]:
    path = source.fetch("modules.json")
    try:
        modules = json.loads(path.read_text(encoding="utf-8")) if path else []
    except (OSError, json.JSONDecodeError):
        return []
    return [m["path"] for m in modules if isinstance(m, dict) and m.get("path")]


def copy_companions(source: TensorSource, dest: Path, *, model_dtype: str) -> list[str]:
    """Copy companion files into ``dest``; ``config.json`` gets ``model_dtype``.

    Returns:
        The relative paths written.
    """
    written = []
    for name in companion_files(source):
        path = source.fetch(name)
        if path is None:
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name == "config.json":
            config = read_config(path)
            if config is not None:
                set_dtype(config, model_dtype)
                target.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
                written.append(name)
                continue
        shutil.copyfile(path, target)
        written.append(name)
    return written


def read_config(path: Path) -> dict[str, Any] | None:
    """``config.json`` as a dict, or None when it is not a JSON object."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s is not valid JSON; copied as is", path)
        return None
    return config if isinstance(config, dict) else None


def set_dtype(config: dict[str, Any], dtype: str) -> None:
    """Record the output dtype under the keys transformers reads (``dtype`` in v5, ``torch_dtype`` before)."""
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = dtype
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        for key in [k for k in ("torch_dtype", "dtype") if k in text_config]:
            text_config[key] = dtype
