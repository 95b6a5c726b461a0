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


def test_a_taken_tensor_must_fit_the_config_the_output_keeps(tmp_path: Path) -> None:
    """A fine-tune with a resized vocabulary: taking its embeddings while the config (vocab_size 128) comes
    from the first model loaded with the embeddings initialised at random. Refused, saying which model to
    list first; listed first, the merge loads with its 130 rows."""
    import hubmerge
    from hubmerge.errors import PlanError

    plain = tiny_llama(0, tmp_path / "plain")
    resized = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama(1, tmp_path / "r"))
    resized.resize_token_embeddings(130)
    resized.save_pretrained(tmp_path / "resized")
    embed = "model.embed_tokens.weight"
    recipe = {
        "method": "centroid",
        "models": [str(plain), str(tmp_path / "resized")],
        "rules": [{"tensors": embed, "take": 1}],
    }
    with pytest.raises(
        PlanError, match=r"taken from models\.1 with shape \[130, 32\].* from models\.0"
    ) as info:
        hubmerge.plan(recipe)
    assert info.value.hint == (
        "list models.1's model first in `models:`, so that its config and tokenizer come with it "
        "(and reorder what follows the models' order: `take:` numbers, per-model lists; "
        "linear's and slerp's t becomes 1 - t)"
    )
    recipe["models"] = recipe["models"][::-1]  # type: ignore[index]
    recipe["rules"] = [{"tensors": embed, "take": 0}]
    out = hubmerge.merge(recipe, tmp_path / "out").out
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.vocab_size == 130
    torch.testing.assert_close(merged.get_input_embeddings().weight, resized.get_input_embeddings().weight)
    assert _logits(merged, torch.tensor([[1, 129]])).shape[-1] == 130


CONFIGURATION = """
from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom"
"""
MODELING = """
from transformers import LlamaForCausalLM

from .configuration_custom import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


def test_a_model_with_code_of_its_own_keeps_it(tmp_path: Path) -> None:
    """`auto_map` names classes in the model's .py files, which trust_remote_code loads from the output."""
    import hubmerge

    models = []
    for i in range(2):
        folder = tiny_llama(i, tmp_path / f"m{i}")
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "tiny_custom"
        config["auto_map"] = {
            "AutoConfig": "configuration_custom.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_custom.TinyCustomForCausalLM",
        }
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "configuration_custom.py").write_text(CONFIGURATION)
        (folder / "modeling_custom.py").write_text(MODELING)
        models.append(folder)
    (models[0] / "train.py").write_text("print('a script of its own')\n")  # copied too: any may be imported
    out = hubmerge.merge({"method": "centroid", "models": [str(m) for m in models]}, tmp_path / "out").out
    assert {p.name for p in out.glob("*.py")} == {"configuration_custom.py", "modeling_custom.py", "train.py"}
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(merged).__name__ == "TinyCustomForCausalLM"
    first = transformers.AutoModelForCausalLM.from_pretrained(models[0], trust_remote_code=True)
    second = transformers.AutoModelForCausalLM.from_pretrained(models[1], trust_remote_code=True)
    name = "model.layers.0.mlp.up_proj.weight"
    expected = (first.state_dict()[name] + second.state_dict()[name]) / 2
    torch.testing.assert_close(merged.state_dict()[name], expected)
    plain = tiny_llama(3, tmp_path / "plain")
    (plain / "train.py").write_text("print('not the model's')\n")
    out = hubmerge.merge({"method": "centroid", "models": [str(plain)]}, tmp_path / "out2").out
    assert not list(out.glob("*.py"))  # no auto_map: a script beside the model is not the model's


def test_the_pickle_hint_converts_a_causal_lm_into_one_that_merges(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command the error gives, run as given: AutoModel would save the bare backbone (no lm_head, no
    `model.` prefix), which a safetensors copy of the same model would not merge with."""
    import subprocess
    import sys

    safe = tiny_llama(0, tmp_path / "safe")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    # What save_pretrained(safe_serialization=False) wrote (transformers 5 writes safetensors regardless).
    torch.save(
        transformers.LlamaForCausalLM.from_pretrained(safe).state_dict(), pickled / "pytorch_model.bin"
    )
    (pickled / "config.json").write_text((safe / "config.json").read_text())
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: linear\nmodels: [safe, pickled]\nparameters: {t: 0.5}\n")
    assert main(["plan", str(recipe)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    command = line.split('python -c "')[1].split('"')[0]
    subprocess.run([sys.executable, "-c", command], check=True, capture_output=True, cwd=tmp_path)
    recipe.write_text("method: linear\nmodels: [safe, pickled-safetensors]\nparameters: {t: 0.5}\n")
    assert main([str(recipe), "--out", str(tmp_path / "out"), "-q"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    original = transformers.LlamaForCausalLM.from_pretrained(safe)
    torch.testing.assert_close(_logits(merged, ids), _logits(original, ids))
