"""End to end through the CLI on tiny real transformers models: load the merge, run it, compare logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hubmerge.cli import main

from .util import tiny_llama

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


def _bert(seed: int, directory: Path) -> Path:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    transformers.BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def test_llama_linear_endpoints_and_midpoint(tmp_path: Path) -> None:
    a = tiny_llama(0, tmp_path / "a", shard="40KB")
    b = tiny_llama(1, tmp_path / "b")
    assert (a / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    model_a = transformers.LlamaForCausalLM.from_pretrained(a)
    model_b = transformers.LlamaForCausalLM.from_pretrained(b)
    for t in (0.0, 1.0, 0.5):
        recipe = tmp_path / f"r{t}.yaml"
        recipe.write_text(
            f"method: linear\nmodels: [a, b]\nparameters: {{t: {t}}}\noutput: {{max_shard_size: 60KB}}\n"
        )
        out = tmp_path / f"out{t}"
        assert main([str(recipe), "--out", str(out), "-q"]) == 0
        assert (out / "model.safetensors.index.json").exists()
        assert (out / "generation_config.json").exists()
        merged = transformers.AutoModelForCausalLM.from_pretrained(out)
        if t == 0.0:
            torch.testing.assert_close(_logits(merged, ids), _logits(model_a, ids))
        elif t == 1.0:
            torch.testing.assert_close(_logits(merged, ids), _logits(model_b, ids))
        else:
            sa, sb, sm = model_a.state_dict(), model_b.state_dict(), merged.state_dict()
            for name, value in sm.items():
                torch.testing.assert_close(value, (sa[name] + sb[name]) / 2, msg=name)
            assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
            generated = merged.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
            assert generated.shape == (1, 7)


def test_bert_classifier_centroid_in_bf16(tmp_path: Path) -> None:
    paths = [_bert(i, tmp_path / f"bert{i}") for i in range(3)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: centroid\nmodels: [bert0, bert1, bert2]\ndtype: bfloat16\n")
    out = tmp_path / "out"
    assert main([str(recipe), "--out", str(out), "-q"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    models = [transformers.BertForSequenceClassification.from_pretrained(p) for p in paths]
    states = [m.state_dict() for m in models]
    for name, value in merged.state_dict().items():
        if value.is_floating_point():
            expected = (sum(s[name] for s in states) / 3).bfloat16().float()
            torch.testing.assert_close(value, expected, msg=name)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    logits = _logits(merged, ids)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_lora_adapters_are_refused_with_how_to_merge_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two real PEFT adapters: averaging their A and B factors one by one is not a merge of their updates."""
    peft = pytest.importorskip("peft")
    base = tiny_llama(0, tmp_path / "base")
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM.from_pretrained(base)
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft.get_peft_model(model, config).save_pretrained(tmp_path / f"lora{seed}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: centroid\nmodels: [lora1, lora2]\n")
    assert main([str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "models.0" in err[0] and "is a PEFT adapter (adapter_model.safetensors)" in err[0]
    ), err
    assert "merge_and_unload" in err[0]
    assert not (tmp_path / "out").exists()
    # The same folders merged into their base first are models like any other.
    for seed in (1, 2):
        merged = peft.PeftModel.from_pretrained(
            transformers.LlamaForCausalLM.from_pretrained(base), tmp_path / f"lora{seed}"
        )
        merged.merge_and_unload().save_pretrained(tmp_path / f"full{seed}")
    recipe.write_text("method: centroid\nmodels: [full1, full2]\n")
    assert main([str(recipe), "--out", str(tmp_path / "out"), "-q"]) == 0
