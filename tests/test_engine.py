"""The engine end to end on real safetensors files: numbers against hand-computed merges."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import hubmerge
from hubmerge.errors import MergeError, OutputError, PlanError, RecipeError
from hubmerge.methods import METHODS

from .util import default_sigint, kill_after_script, random_tensors, save_model, write_recipe


@pytest.fixture()
def three(tmp_path: Path) -> list[Path]:
    return [save_model(tmp_path / f"m{i}", random_tensors(i)) for i in range(3)]


def _sd(out: Path) -> dict[str, torch.Tensor]:
    if (out / "model.safetensors").exists():
        return load_file(str(out / "model.safetensors"))
    merged: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("model-*.safetensors")):
        merged |= load_file(str(f))
    return merged


def test_linear_matches_hand_computed(tmp_path: Path, three: list[Path]) -> None:
    a, b = load_file(str(three[0] / "model.safetensors")), load_file(str(three[1] / "model.safetensors"))
    recipe = {"method": "linear", "models": [str(three[0]), str(three[1])], "parameters": {"t": 0.3}}
    result = hubmerge.merge(recipe, tmp_path / "out")
    out = _sd(result.out)
    for name, value in a.items():
        if value.is_floating_point():
            torch.testing.assert_close(out[name], 0.7 * value + 0.3 * b[name])
        else:
            assert torch.equal(out[name], value)
    assert set(out) == set(a)


def test_weighted_with_bf16_output_and_per_model_weights(tmp_path: Path, three: list[Path]) -> None:
    sds = [load_file(str(p / "model.safetensors")) for p in three]
    recipe = {
        "method": "weighted",
        "models": [{"path": str(three[0]), "weight": 1.0}, {"path": str(three[1]), "weight": 3.0}],
        "dtype": "bfloat16",
    }
    out = _sd(hubmerge.merge(recipe, tmp_path / "out").out)
    expected = (0.25 * sds[0]["layer.0.weight"] + 0.75 * sds[1]["layer.0.weight"]).bfloat16()
    assert out["layer.0.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(out["layer.0.weight"], expected)
    assert out["position_ids"].dtype == torch.int64
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_through_the_engine_equals_the_function(
    tmp_path: Path, three: list[Path], method: str
) -> None:
    spec = METHODS[method]
    base = save_model(tmp_path / "base", random_tensors(99))
    models = three[: spec.max_models or 3]
    recipe: dict[str, object] = {
        "method": method,
        "models": [str(p) for p in models],
        "parameters": {"seed": 7},
    }
    if spec.needs_base:
        recipe["base"] = str(base)
    if any(p.name == "t" for p in spec.params):
        recipe["parameters"] = {"t": 0.4}
    plan = hubmerge.plan(recipe)
    out = _sd(hubmerge.merge(recipe, tmp_path / "out").out)
    sds = [load_file(str(p / "model.safetensors")) for p in models]
    base_sd = load_file(str(base / "model.safetensors"))
    for job in plan.jobs:
        if job.action != "merge":
            continue
        kwargs = dict(job.params)
        if spec.needs_base:
            kwargs["base"] = base_sd[job.name]
        if spec.random:
            kwargs["generator"] = torch.Generator().manual_seed(job.seed)
        expected = spec.fn([sd[job.name] for sd in sds], **kwargs)
        torch.testing.assert_close(out[job.name], expected, msg=f"{method}: {job.name}")


def test_row_chunks_give_the_same_bytes(tmp_path: Path, three: list[Path]) -> None:
    recipe = {"method": "centroid", "models": [str(p) for p in three]}
    whole = hubmerge.merge(recipe, tmp_path / "whole")
    chunked = hubmerge.merge(recipe, tmp_path / "chunked", memory_budget=512)
    assert any(job.chunk_rows for job in chunked.plan.jobs)
    assert (whole.out / "model.safetensors").read_bytes() == (chunked.out / "model.safetensors").read_bytes()


def test_dare_is_deterministic_and_seeded_per_tensor(tmp_path: Path, three: list[Path]) -> None:
    base = save_model(tmp_path / "base", random_tensors(99))
    recipe = {
        "method": "dare_ties",
        "base": str(base),
        "models": [str(p) for p in three],
        "parameters": {"seed": 1},
    }
    first = hubmerge.merge(recipe, tmp_path / "a").out / "model.safetensors"
    second = hubmerge.merge(recipe, tmp_path / "b").out / "model.safetensors"
    assert first.read_bytes() == second.read_bytes()
    assert "- `seed` = 1\n" in (first.parent / "README.md").read_text()  # the card says which masks
    other = hubmerge.merge({**recipe, "parameters": {"seed": 2}}, tmp_path / "c").out / "model.safetensors"
    assert load_file(str(other))["layer.0.weight"].ne(load_file(str(first))["layer.0.weight"]).any()


def test_sharded_inputs_and_outputs(tmp_path: Path) -> None:
    sds = [random_tensors(i) for i in range(2)]
    a = save_model(tmp_path / "a", sds[0], shards=3)
    b = save_model(tmp_path / "b", sds[1], shards=2)
    recipe = {
        "method": "linear",
        "models": [str(a), str(b)],
        "parameters": {"t": 0.5},
        "output": {"max_shard_size": 600},
    }
    result = hubmerge.merge(recipe, tmp_path / "out")
    shards = sorted(p.name for p in result.out.glob("model-*.safetensors"))
    assert len(shards) == len(result.plan.shards) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((result.out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sds[0].values())
    assert set(index["weight_map"]) == set(sds[0])
    for shard in shards:
        with safe_open(str(result.out / shard), framework="pt") as f:
            assert f.metadata()["format"] == "pt"
            assert f.metadata()["recipe_sha256"] == result.plan.recipe_sha256
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert index["weight_map"][name] == shard
                torch.testing.assert_close(
                    f.get_tensor(name),
                    (sds[0][name] + sds[1][name]) / 2 if sds[0][name].is_floating_point() else sds[0][name],
                )


def test_integer_buffers_must_agree(tmp_path: Path) -> None:
    a = random_tensors(0)
    b = random_tensors(1) | {"position_ids": torch.arange(16).flip(0).unsqueeze(0)}
    recipe = {
        "method": "centroid",
        "models": [str(save_model(tmp_path / "a", a)), str(save_model(tmp_path / "b", b))],
    }
    with pytest.raises(MergeError, match="position_ids"):
        hubmerge.merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    fixed = {**recipe, "rules": [{"tensors": "position_ids", "take": 1}]}
    out = _sd(hubmerge.merge(fixed, tmp_path / "out", force=True).out)
    assert torch.equal(out["position_ids"], b["position_ids"])


def test_rules_take_skip_and_parameters(tmp_path: Path, three: list[Path]) -> None:
    a, b = (load_file(str(p / "model.safetensors")) for p in three[:2])
    recipe = {
        "method": "linear",
        "models": [str(three[0]), str(three[1])],
        "parameters": {"t": 0.5},
        "rules": [
            {"tensors": "head.*", "take": 1},
            {"tensors": "norm.*", "skip": True},
            {"tensors": ["layer.1.*"], "parameters": {"t": 0.9}},
        ],
    }
    out = _sd(hubmerge.merge(recipe, tmp_path / "out").out)
    assert torch.equal(out["head.weight"], b["head.weight"])
    assert "norm.weight" not in out
    torch.testing.assert_close(out["layer.1.weight"], 0.1 * a["layer.1.weight"] + 0.9 * b["layer.1.weight"])
    torch.testing.assert_close(out["layer.0.weight"], 0.5 * a["layer.0.weight"] + 0.5 * b["layer.0.weight"])


def test_mixed_dtypes_are_merged_in_float32_with_a_notice(tmp_path: Path) -> None:
    a = save_model(tmp_path / "a", random_tensors(0))
    b = save_model(tmp_path / "b", random_tensors(1, dtype=torch.bfloat16))
    plan = hubmerge.plan({"method": "centroid", "models": [str(a), str(b)]})
    assert plan.notices and "different dtypes" in plan.notices[0]
    out = _sd(hubmerge.merge({"method": "centroid", "models": [str(a), str(b)]}, tmp_path / "out").out)
    sa, sb = random_tensors(0), random_tensors(1, dtype=torch.bfloat16)
    assert out["layer.0.weight"].dtype == torch.float32  # the first model's dtype
    torch.testing.assert_close(
        out["layer.0.weight"], (sa["layer.0.weight"] + sb["layer.0.weight"].float()) / 2
    )


def test_missing_tensor_and_shape_mismatch_are_named(tmp_path: Path) -> None:
    a = save_model(tmp_path / "a", random_tensors(0))
    short = random_tensors(1)
    del short["layer.1.weight"]
    b = save_model(tmp_path / "b", short)
    with pytest.raises(PlanError, match=r"'layer.1.weight' is in models.0 .* missing in models.1"):
        hubmerge.plan({"method": "centroid", "models": [str(a), str(b)]})
    wide = random_tensors(1) | {"head.weight": torch.zeros(4, 8)}
    c = save_model(tmp_path / "c", wide)
    with pytest.raises(
        PlanError, match=r"'head.weight' has different shapes: models.0 \[3, 8\], models.1 \[4, 8\]"
    ):
        hubmerge.plan({"method": "centroid", "models": [str(a), str(c)]})


def test_output_rules(tmp_path: Path, three: list[Path]) -> None:
    recipe = {"method": "centroid", "models": [str(p) for p in three]}
    out = hubmerge.merge(recipe, tmp_path / "out").out
    marker = out / "keep.txt"
    marker.write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        hubmerge.merge(recipe, out)
    assert marker.exists()
    with pytest.raises(OutputError, match="did not write: keep.txt"):  # not the merge's: kept
        hubmerge.merge(recipe, out, force=True)
    assert marker.read_text() == "mine"
    marker.unlink()
    hubmerge.merge(recipe, out, force=True)
    assert (out / "model.safetensors").exists()
    with pytest.raises(OutputError, match="inside the input"):
        hubmerge.merge(recipe, three[0] / "merged")
    # A single-file input is that file, not its folder: the output may sit beside it.
    files = {"method": "centroid", "models": [str(p / "model.safetensors") for p in three]}
    assert (hubmerge.merge(files, three[0] / "beside").out / "model.safetensors").exists()
    with pytest.raises(OutputError, match="is or lies inside the input"):
        hubmerge.merge(files, three[0] / "model.safetensors" / "x")
    with pytest.raises(OutputError, match="contains the input"):
        hubmerge.merge(recipe, tmp_path, force=True)
    assert all((p / "model.safetensors").exists() for p in three)


def test_force_replaces_only_an_earlier_merge(tmp_path: Path, three: list[Path]) -> None:
    """A mistyped ``--out ~/project --force`` must not delete a project: --force replaces a merge's output
    (it holds hubmerge.json) or an empty directory, nothing else."""
    recipe = {"method": "centroid", "models": [str(p) for p in three]}
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="is not the output of a merge .*no hubmerge.json") as info:
        hubmerge.merge(recipe, project, force=True)
    assert info.value.hint is not None and "choose another `out`" in info.value.hint
    assert (project / "thesis.tex").read_text() == "years of work" and (project / ".git").is_dir()
    assert not (tmp_path / ".project.hubmerge-partial").exists()
    with pytest.raises(OutputError, match="already exists, and is not the output of a merge") as info:
        hubmerge.merge(recipe, project)  # no hint at force=True, which would be refused
    assert info.value.hint is not None and "force" not in info.value.hint
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (hubmerge.merge(recipe, empty).out / "model.safetensors").exists()  # no --force needed
    file = tmp_path / "precious.txt"
    file.write_text("keep me")
    for force in (False, True):
        with pytest.raises(OutputError, match="exists and is not a directory"):
            hubmerge.merge(recipe, file, force=force)
    assert file.read_text() == "keep me" and not (tmp_path / ".precious.txt.hubmerge-old").exists()
    refused = subprocess.run(
        [sys.executable, "-m", "hubmerge.cli", str(write_recipe(tmp_path / "r.yaml", json.dumps(recipe)))]
        + ["--out", str(project), "--force"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "hubmerge.json" in refused.stderr


def test_force_keeps_what_the_earlier_merge_did_not_write(tmp_path: Path, three: list[Path]) -> None:
    """A merge cloned back from the Hub (its .git), an evaluation or an export beside it: --force replaces
    the merge's own files, and refuses while anything else is there, naming it."""
    recipe = {"method": "centroid", "models": [str(p) for p in three]}
    out = tmp_path / "out"
    first = hubmerge.merge(recipe, out)
    manifest = json.loads((out / "hubmerge.json").read_text())
    assert manifest["files"] == sorted(first.files)
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / "eval_results.json").write_text("{}")
    with pytest.raises(
        OutputError, match=r"did not write: \.git/, eval_results\.json; force=True would"
    ) as info:
        hubmerge.merge(recipe, out, force=True)
    assert info.value.hint == "move them out of that directory first, or choose another `out`"
    assert (out / ".git" / "HEAD").is_file() and (out / "eval_results.json").is_file()
    assert not (tmp_path / ".out.hubmerge-partial").exists()
    shutil.rmtree(out / ".git")
    (out / "eval_results.json").unlink()
    (out / "README.md").write_text("edited card")  # the merge's own file: replaced
    hubmerge.merge(recipe, out, force=True)
    assert (out / "README.md").read_text() != "edited card"
    # A merge written before manifests listed files: judged by name
    del manifest["files"]
    (out / "hubmerge.json").write_text(json.dumps(manifest))
    (out / "tokenizer.json").write_text("{}")
    (out / "1_Pooling").mkdir()
    (out / "onnx").mkdir()
    with pytest.raises(OutputError, match=r"did not write: onnx/;"):
        hubmerge.merge(recipe, out, force=True)
    (out / "onnx").rmdir()
    hubmerge.merge(recipe, out, force=True)


def test_force_keeps_files_in_the_merges_folders_and_those_added_while_it_ran(
    tmp_path: Path, three: list[Path]
) -> None:
    """Notes put in a folder the merge wrote (a sentence-transformers module's) are the user's; so is a
    file that appears while the merge runs: the finished merge waits beside the output for a resume."""
    for model in three:
        (model / "modules.json").write_text('[{"idx": 1, "name": "1", "path": "1_Pooling", "type": "p"}]')
        (model / "1_Pooling").mkdir()
        (model / "1_Pooling" / "config.json").write_text("{}")
    recipe = {"method": "centroid", "models": [str(p) for p in three]}
    out = tmp_path / "out"
    hubmerge.merge(recipe, out)
    (out / "1_Pooling" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"did not write: 1_Pooling/notes\.txt;"):
        hubmerge.merge(recipe, out, force=True)
    (out / "1_Pooling" / "notes.txt").unlink()

    def add_a_file(plan: object) -> None:  # the merge has checked the output: now someone writes there
        (out / "eval.json").write_text("{}")

    with pytest.raises(OutputError, match=r"while merging, eval\.json appeared in") as info:
        hubmerge.merge(recipe, out, force=True, on_plan=add_a_file)
    assert info.value.hint is not None and "rerun with resume=True, force=True" in info.value.hint
    assert (out / "eval.json").is_file() and (tmp_path / ".out.hubmerge-partial").is_dir()
    (out / "eval.json").unlink()
    done = hubmerge.merge(recipe, out, force=True, resume=True)
    assert done.resumed_tensors == len(done.plan.jobs) and (out / "1_Pooling" / "config.json").is_file()


def test_resume_refuses_a_local_input_rewritten_since(tmp_path: Path) -> None:
    """The interrupted run's tensors came from the old checkpoint: mixing them with the new one's is wrong."""
    recipe, out = _two_model_recipe(tmp_path), tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER, str(recipe), "3", str(out)], capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL
    save_model(tmp_path / "m1", random_tensors(7), shards=2)  # a later checkpoint, same shapes
    with pytest.raises(OutputError, match=r"different inputs: models.1 \(.*m1\) changed, its weight files"):
        hubmerge.merge(recipe, out, resume=True)
    resumed = hubmerge.merge(recipe, out, force=True)
    fresh = hubmerge.merge(recipe, tmp_path / "fresh")
    assert (resumed.out / fresh.plan.shards[0].filename).read_bytes() == (
        fresh.out / fresh.plan.shards[0].filename
    ).read_bytes()


def test_a_module_with_weights_of_its_own_is_refused_before_reading(tmp_path: Path) -> None:
    """A sentence-transformers ``2_Dense`` module holds weights outside the checkpoint: merged without them,
    the model would not load, so the plan refuses it, naming the file."""
    models = [save_model(tmp_path / f"m{i}", random_tensors(i)) for i in range(2)]
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    for model in models:
        (model / "modules.json").write_text(json.dumps(modules))
        (model / "1_Pooling").mkdir()
        (model / "1_Pooling" / "config.json").write_text("{}")
    recipe = {"method": "centroid", "models": [str(m) for m in models]}
    assert (hubmerge.merge(recipe, tmp_path / "pooled").out / "1_Pooling" / "config.json").exists()
    save_model(models[1] / "2_Dense", {"linear.weight": torch.ones(2, 2)})  # in the second model only
    with pytest.raises(PlanError, match="models.1: the sentence-transformers module 2_Dense has weights"):
        hubmerge.plan(recipe)
    save_model(models[0] / "2_Dense", {"linear.weight": torch.ones(2, 2)})
    with pytest.raises(PlanError, match="module 2_Dense has weights of its own .*2_Dense/model.safetensors"):
        hubmerge.plan(recipe)
    with pytest.raises(PlanError, match="2_Dense"):
        hubmerge.merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.hubmerge-partial").exists()


def test_a_source_without_a_license_leaves_the_card_license_unknown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    licensed = "---\nlicense: apache-2.0\n---\n# A fine-tune\n"
    a = save_model(tmp_path / "a", random_tensors(0), card=licensed)
    b = save_model(tmp_path / "b", random_tensors(1))
    out = hubmerge.merge({"method": "centroid", "models": [str(a), str(b)]}, tmp_path / "out").out
    assert "license: unknown" in (out / "README.md").read_text()
    assert "models.0 declares apache-2.0, but models.1" in caplog.text and "card: {license" in caplog.text
    both = hubmerge.merge({"method": "centroid", "models": [str(a), str(a)]}, tmp_path / "both").out
    assert "license: apache-2.0" in (both / "README.md").read_text()


def test_licenses_compare_as_the_hub_reads_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Case aside; `other` by its license_name, which the card keeps with the link; a list of licenses or
    metadata that does not parse is no license to claim for the merge, and the warning says which."""

    def model(name: str, card: str) -> str:
        return str(save_model(tmp_path / name, random_tensors(0), card=card))

    upper, lower = model("upper", "---\nlicense: MIT\n---\n"), model("lower", "---\nlicense: mit\n---\n")
    out = hubmerge.merge({"method": "centroid", "models": [upper, lower]}, tmp_path / "out").out
    assert "\nlicense: mit\n" in (out / "README.md").read_text()
    foo = model("foo", "---\nlicense: other\nlicense_name: foo\nlicense_link: https://x.org/foo\n---\n")
    bar = model("bar", "---\nlicense: other\nlicense_name: bar\n---\n")
    with pytest.raises(
        RecipeError, match=r"different licenses \(models\.0: other \(foo\), models\.1: other \(bar\)\)"
    ):
        hubmerge.plan({"method": "centroid", "models": [foo, bar]})
    out = hubmerge.merge({"method": "centroid", "models": [foo, foo]}, tmp_path / "foo2").out
    card = (out / "README.md").read_text()
    assert "license: other\nlicense_name: foo\nlicense_link: https://x.org/foo\n" in card
    far = model("far", "---\nlicense: other\nlicense_name: foo\nlicense_link: https://x.org/foo\n---\n")
    near = model("near", "---\nlicense: other\nlicense_name: foo\nlicense_link: LICENSE\n---\n")
    for order in ([near, far], [far, near]):  # the absolute link, whichever source gives it
        card = (
            hubmerge.merge({"method": "centroid", "models": order}, tmp_path / "o", force=True).out
            / "README.md"
        )
        assert "license_link: https://x.org/foo\n" in card.read_text()
    out = hubmerge.merge({"method": "centroid", "models": [near, near]}, tmp_path / "near2").out
    card = (out / "README.md").read_text()  # a link into the source's folder, which the merge does not copy
    assert "license_name: foo\n" in card and "license_link" not in card
    listed = model("listed", "---\nlicense: [mit, apache-2.0]\n---\n")
    broken = model("broken", "---\nlicense: mit\n  bad: [\n---\n")
    hubmerge.merge({"method": "centroid", "models": [lower, listed, broken]}, tmp_path / "mixed")
    assert "models.1 (" in caplog.text and "): its card lists 2 licenses" in caplog.text
    assert "): its card's metadata does not parse" in caplog.text


def test_resume_names_a_model_the_recipe_swapped(tmp_path: Path) -> None:
    recipe, out = _two_model_recipe(tmp_path), tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER, str(recipe), "3", str(out)], capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL
    other = save_model(tmp_path / "other", random_tensors(1), shards=2)
    recipe.write_text(recipe.read_text().replace(str(tmp_path / "m1"), str(other)))
    with pytest.raises(OutputError, match=f"a different recipe: models.1 is now {other}, it was .*m1"):
        hubmerge.merge(recipe, out, resume=True)


def test_only_local_models_are_stamped(tmp_path: Path) -> None:
    """A Hub model read from the local Hugging Face cache is named by its commit, online or offline alike."""
    from hubmerge.refs import ModelRef
    from hubmerge.sources.local import LocalSource

    folder = save_model(tmp_path / "m", random_tensors(0))
    local = LocalSource(ModelRef(path=folder), label="models.0")
    cached = LocalSource(ModelRef(repo_id="org/m"), label="models.0", path=folder, commit="a" * 40)
    assert isinstance(local.stamp, str) and cached.stamp is None
    local.close()
    cached.close()


def test_recipes_built_in_code_get_the_same_checks(tmp_path: Path, three: list[Path]) -> None:
    from hubmerge.errors import RecipeError

    nan = hubmerge.Recipe(method="linear", models=[str(p) for p in three[:2]], parameters={"t": float("nan")})
    with pytest.raises(RecipeError, match="parameters.t.*not a finite number"):
        hubmerge.merge(nan, tmp_path / "out")
    zero = hubmerge.Recipe(
        method="weighted",
        models=[{"path": str(three[0]), "weight": 1}, {"path": str(three[1]), "weight": -1}],
    )
    with pytest.raises(RecipeError, match="sum to 0"):
        hubmerge.plan(zero)
    assert not (tmp_path / ".out.hubmerge-partial").exists()


def test_a_resumed_run_counts_only_what_it_read(tmp_path: Path) -> None:
    recipe, out = _two_model_recipe(tmp_path), tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER, str(recipe), "3", str(out)], capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL
    done = set((tmp_path / ".out.hubmerge-partial" / ".hubmerge-progress" / "journal").read_text().split())
    result = hubmerge.merge(recipe, out, resume=True)
    assert result.resumed_tensors == len(done) == 3
    skipped = sum(i.nbytes for j in result.plan.jobs if j.name in done for i in j.inputs)
    assert 0 < skipped and result.bytes_read == result.plan.bytes_read - skipped


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_ties_elects_plus_where_the_task_vectors_cancel_through_the_engine(
    tmp_path: Path, method: str
) -> None:
    """A merge elects + where the weighted task vectors cancel exactly, as mergekit (test_kernels checks the
    fused kernel on the same case)."""
    shape = (64, 256)
    base = save_model(tmp_path / "base", {"w": torch.zeros(shape)})
    x = save_model(tmp_path / "x", {"w": torch.full(shape, -2.0)})
    y = save_model(tmp_path / "y", {"w": torch.full(shape, 4.0)})
    recipe = {
        "method": method,
        "base": str(base),
        "models": [{"path": str(x), "weight": 1.0}, {"path": str(y), "weight": 0.5}],
        "parameters": {"density": 1.0},
    }
    out = _sd(hubmerge.merge(recipe, tmp_path / "out").out)
    torch.testing.assert_close(out["w"], torch.full(shape, 4.0), rtol=0, atol=0)


def test_same_recipe_same_bytes(tmp_path: Path, three: list[Path]) -> None:
    recipe = {"method": "weighted", "models": [str(p) for p in three], "dtype": "bfloat16"}
    first = hubmerge.merge(recipe, tmp_path / "a" / "out").out
    second = hubmerge.merge(recipe, tmp_path / "b" / "out").out
    for name in ("model.safetensors", "hubmerge.json", "README.md", "config.json", "recipe.yaml"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # The stored recipe, local paths made absolute, plans the same merge from wherever it is read; it names
    # no output (where the merge went is no part of it), so its first line says to give one.
    assert (
        "rerun with `hubmerge recipe.yaml --out DIR`" in (first / "recipe.yaml").read_text().splitlines()[0]
    )
    stored = hubmerge.plan(first / "recipe.yaml")
    assert stored.recipe_sha256 == hubmerge.plan(recipe).recipe_sha256
    relative = write_recipe(tmp_path / "r.yaml", "method: weighted\nmodels: [a/m0, ./a/m1]\n")
    (tmp_path / "a").mkdir(exist_ok=True)
    for i in range(2):
        save_model(tmp_path / "a" / f"m{i}", random_tensors(i))
    moved = hubmerge.merge(relative, tmp_path / "rel").out
    assert f"- {tmp_path / 'a' / 'm0'}" in (moved / "recipe.yaml").read_text()
    assert hubmerge.plan(moved / "recipe.yaml").fingerprint() == hubmerge.plan(relative).fingerprint()
    # The same recipe and inputs in another folder (a checkout elsewhere, another CI machine): the same bytes.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "a", elsewhere / "a")
    shutil.copy(relative, elsewhere / "r.yaml")
    there = hubmerge.merge(elsewhere / "r.yaml", tmp_path / "there").out
    assert (there / "model.safetensors").read_bytes() == (moved / "model.safetensors").read_bytes()


def test_stored_paths_in_the_home_directory_name_no_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a merge stores (and a push publishes) writes a model under the home directory as ~/...: the same
    files on this machine, without /home/<user> in a public card."""
    home = tmp_path / "home" / "alice"
    models = [save_model(home / "ckpt" / f"m{i}", random_tensors(i)) for i in range(2)]
    monkeypatch.setenv("HOME", str(home))
    recipe = {"method": "linear", "models": [str(p) for p in models], "parameters": {"t": 0.25}}
    out = hubmerge.merge(recipe, tmp_path / "out").out
    for name in ("recipe.yaml", "README.md", "hubmerge.json"):
        text = (out / name).read_text()
        assert str(home) not in text, name
        assert "~/ckpt/m1" in text, name
    assert hubmerge.plan(out / "recipe.yaml").fingerprint() == hubmerge.plan(recipe).fingerprint()
    # What the model is does not depend on $HOME (a resume under sudo, in a container), and a home reached
    # through a symlink is recognised in the resolved paths too.
    fingerprint = hubmerge.plan(recipe).fingerprint()
    link = tmp_path / "link"
    link.symlink_to(home.parent)
    monkeypatch.setenv("HOME", str(link / "alice"))
    assert hubmerge.plan(recipe).fingerprint() == fingerprint
    linked = hubmerge.merge(recipe, tmp_path / "linked").out
    assert (
        "~/ckpt/m1" in (linked / "hubmerge.json").read_text()
        and str(home) not in (linked / "README.md").read_text()
    )


KILL_AFTER = kill_after_script()


def _two_model_recipe(tmp_path: Path) -> Path:
    """Two small models merged into many tiny shards: a run stopped after a few tensors leaves most to do."""
    models = [save_model(tmp_path / f"m{i}", random_tensors(i), shards=2) for i in range(2)]
    return write_recipe(
        tmp_path / "r.yaml",
        f"method: linear\nmodels: [{models[0]}, {models[1]}]\nparameters: {{t: 0.7}}\n"
        "output: {max_shard_size: 400}\n",
    )


def _resume(recipe: Path, out: Path) -> str:
    """Finish a stopped merge with ``--resume``; check the bytes against a fresh merge; return its output."""
    resumed = subprocess.run(
        [sys.executable, "-m", "hubmerge.cli", str(recipe), "--out", str(out), "--resume"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    fresh = hubmerge.merge(recipe, out.parent / "fresh")
    for shard in fresh.plan.shards:
        assert (out / shard.filename).read_bytes() == (fresh.out / shard.filename).read_bytes()
    assert not (out.parent / f".{out.name}.hubmerge-partial").exists()
    return resumed.stdout


def test_resume_after_kill_gives_identical_bytes(tmp_path: Path) -> None:
    recipe, out = _two_model_recipe(tmp_path), tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER, str(recipe), "3", str(out)], capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    partial = tmp_path / ".out.hubmerge-partial"
    assert len((partial / ".hubmerge-progress" / "journal").read_text().splitlines()) == 3
    refused = subprocess.run(
        [sys.executable, "-m", "hubmerge.cli", str(recipe), "--out", str(out)], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "--resume" in refused.stderr
    assert "3 tensors resumed" in _resume(recipe, out)


def test_a_resume_rewrites_a_shard_cut_short(tmp_path: Path) -> None:
    """A shard file shorter than the plan says (a disk that lost its tail, a copy cut short) is not trusted:
    its journaled tensors are merged again rather than read back as zeros."""
    recipe, out = _two_model_recipe(tmp_path), tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER, str(recipe), "3", str(out)], capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL
    partial = tmp_path / ".out.hubmerge-partial"
    journal = (partial / ".hubmerge-progress" / "journal").read_text().splitlines()
    plan = hubmerge.plan(recipe)
    shard = plan.shards[next(j.shard for j in plan.jobs if j.name == journal[0])]
    os.truncate(partial / shard.filename, len(shard.header) + 8)
    _resume(recipe, out)


def test_a_second_run_into_the_same_output_is_refused_while_the_first_writes(tmp_path: Path) -> None:
    """Two runs would share one partial folder, and the first would rename the second's half-written shards
    into place as its own output."""
    from hubmerge.writer import lock_path, output_lock

    models = [str(save_model(tmp_path / f"m{i}", random_tensors(i))) for i in range(2)]
    recipe = {"method": "centroid", "models": models}
    out = tmp_path / "new" / "deeper" / "out"
    with output_lock(out):
        assert lock_path(out).read_text() == f"{os.getpid()}\n"
        with pytest.raises(OutputError) as refused:
            hubmerge.merge(recipe, out)
        assert refused.value.message == f"another hubmerge run (pid {os.getpid()}) is writing {out}"
        text = "method: centroid\nmodels: [" + ", ".join(models) + "]\n"
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "hubmerge.cli",
                str(write_recipe(tmp_path / "r.yaml", text)),
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
        )
        assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1, cli.stderr
        said = f"error: another hubmerge run (pid {os.getpid()}) is writing {out} (hint: wait"
        assert cli.stderr.startswith(said), cli.stderr
    assert not (tmp_path / "new").exists()  # the folders made for the lock go with it
    with pytest.raises(RecipeError):  # a run that fails before writing leaves no folders either
        hubmerge.merge({"method": "linear", "models": models}, out)
    assert not (tmp_path / "new").exists()
    done = hubmerge.merge(recipe, out)
    assert (done.out / "model.safetensors").exists() and not lock_path(out).exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("sig", "said"),
    [("SIGTERM", "terminated (SIGTERM)"), ("SIGHUP", "terminated (SIGHUP)"), ("SIGINT", "interrupted")],
)
def test_a_signal_stops_the_merge_cleanly_for_resume(tmp_path: Path, sig: str, said: str) -> None:
    """SIGTERM (kill, timeout, a scheduler's time limit) and SIGHUP (a closed terminal) stop a merge as Ctrl-C
    does: one line naming the partial output, exit 128 + the signal, the finished tensors kept for a resume
    of identical bytes."""
    recipe, out, partial = _two_model_recipe(tmp_path), tmp_path / "out", tmp_path / ".out.hubmerge-partial"
    stopped = subprocess.run(
        [sys.executable, "-c", kill_after_script(signal=sig), str(recipe), "3", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=default_sigint,
    )
    assert stopped.returncode == 128 + getattr(signal, sig), stopped.stderr
    assert stopped.stderr.strip() == (
        f"{said} (hint: the finished tensors are kept in {partial}: rerun with --resume to continue)"
    )
    assert not out.exists()
    assert len((partial / ".hubmerge-progress" / "journal").read_text().splitlines()) >= 3
    assert "tensors resumed" in _resume(recipe, out)


def test_an_ignored_sighup_stays_ignored(tmp_path: Path) -> None:
    """Under nohup (SIGHUP ignored), a hang-up on the way does not stop the merge."""
    recipe, out = _two_model_recipe(tmp_path), tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", kill_after_script(signal="SIGHUP"), str(recipe), "3", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    assert done.returncode == 0, done.stderr
    fresh = hubmerge.merge(recipe, tmp_path / "fresh")
    for shard in fresh.plan.shards:
        assert (out / shard.filename).read_bytes() == (fresh.out / shard.filename).read_bytes()


BIG = {"big.weight": (3000, 700), "wide.weight": (3, 200_001), "vec": (600_000,), "small": (7, 9)}


def _big_models(tmp_path: Path) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    base = {
        n: torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, (n, s) in enumerate(BIG.items())
    }
    sds = []
    for m in range(4):
        g = torch.Generator().manual_seed(100 + m)
        sds.append(
            {n: (t + 0.1 * torch.randn(t.shape, generator=g) if m else t).bfloat16() for n, t in base.items()}
        )
    return [save_model(tmp_path / f"big{m}", sd, shards=1 + m % 2) for m, sd in enumerate(sds)], sds


@pytest.mark.parametrize("method", sorted(METHODS))
def test_blocked_merges_match_whole_tensor_math(tmp_path: Path, method: str) -> None:
    """Tensors far larger than one block go through the blocked engine (and passes for ties, slerp,
    model_stock); the result must equal the method's whole-tensor function."""
    from hubmerge.layout import BLOCK

    spec = METHODS[method]
    dirs, sds = _big_models(tmp_path)
    n = spec.max_models or 3
    recipe: dict[str, object] = {"method": method, "models": [str(d) for d in dirs[1 : 1 + n]],
                                 "dtype": "float32", "parameters": {"seed": 3}}  # fmt: skip
    if spec.needs_base:
        recipe["base"] = str(dirs[0])
    if any(p.name == "t" for p in spec.params):
        recipe["parameters"] = {"seed": 3, "t": 0.3}
    outputs = []
    for budget in (256 * 2**20, 4096):
        result = hubmerge.merge(recipe, tmp_path / f"out-{budget}", memory_budget=budget)
        outputs.append((result.out / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1], "output bytes depend on the memory budget"
    merged = load_file(str(tmp_path / "out-4096" / "model.safetensors"))
    assert max(t.numel() for t in merged.values()) > 4 * BLOCK
    for name in BIG:
        inputs = [sd[name].float() for sd in sds[1 : 1 + n]]
        job = next(j for j in result.plan.jobs if j.name == name)
        kwargs = dict(job.params)
        if spec.needs_base:
            kwargs["base"] = sds[0][name].float()
        if spec.random:
            if merged[name].numel() < 10_000:
                continue  # too few elements for the statistics below
            base, density = sds[0][name].float(), job.params["densities"][0]
            changed = (merged[name] != base).double().mean().item()
            kept_any = 1 - (1 - density) ** n  # an element keeps the base only when every model drops it
            assert abs(changed - kept_any) < 0.02, (name, changed, kept_any)
            continue
        expected = spec.fn(inputs, **kwargs)
        if method in ("slerp", "model_stock"):
            # Whole-tensor angles and norms come from sums of millions of float32 products: the blocked and
            # the whole-tensor results may differ in rounding, so both are held to float64 math, where the
            # blocked one must do at least as well.
            wide = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            reference = spec.fn([t.double() for t in inputs], **wide).float()
            whole_error = (expected - reference).abs().max()
            assert (merged[name] - reference).abs().max() <= max(whole_error, 1e-6), f"{method}: {name}"
            continue
        tol = {"rtol": 0, "atol": 0} if method == "ties" else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(merged[name], expected, **tol, msg=f"{method}: {name}")


def test_merging_needs_no_numpy(tmp_path: Path) -> None:
    # numpy is not a dependency of hubmerge (nor of torch): a merge must not reach for it.
    models = [save_model(tmp_path / f"m{i}", random_tensors(i)) for i in range(2)]
    recipe = {"method": "linear", "models": [str(m) for m in models], "parameters": {"t": 0.25}}
    script = (
        "import json, sys\nsys.modules['numpy'] = None  # import numpy now fails\nimport hubmerge\n"
        "hubmerge.merge(json.loads(sys.argv[1]), sys.argv[2])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, json.dumps(recipe), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    a, b = (load_file(str(m / "model.safetensors")) for m in models)
    for name, value in a.items():
        expected = 0.75 * value + 0.25 * b[name] if value.is_floating_point() else value
        torch.testing.assert_close(merged[name], expected)


def test_float16_output_beyond_its_range_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """bfloat16 (and float32) reach far beyond float16's 65504: a float16 merge writes those as infinity,
    and says so, naming the tensor."""
    big = torch.tensor([[1e5, -7e4, 65000.0, 1.0]] * 64, dtype=torch.bfloat16)
    models = [
        save_model(tmp_path / f"m{i}", {"emb": big * (1 + i), "ok": torch.ones(8, 8)}) for i in range(2)
    ]
    recipe = {"method": "centroid", "models": [str(m) for m in models], "dtype": "float16"}
    copied = recipe | {"rules": [{"tensors": "emb", "take": 1}]}  # cast, not merged: 3 per row overflow
    with caplog.at_level("WARNING", logger="hubmerge"):
        hubmerge.merge(copied, tmp_path / "copied")
    assert any(r.getMessage().startswith("192 values in 1 float16 tensors") for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="hubmerge"):
        out = hubmerge.merge(recipe, tmp_path / "out").out
    merged = load_file(str(out / "model.safetensors"))
    assert int(merged["emb"].isinf().sum()) == 192 and not merged["ok"].isinf().any()  # 1.5x: 3 per row
    said = [r.getMessage() for r in caplog.records if "float16" in r.getMessage()]
    assert (
        len(said) == 1
        and said[0].startswith("192 values in 1 float16 tensors")
        and "(most in emb: 192)" in said[0]
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="hubmerge"):
        hubmerge.merge(recipe | {"dtype": "bfloat16"}, tmp_path / "bf16")
    assert not [r for r in caplog.records if "infinity" in r.getMessage()]


def test_a_force_commit_cut_between_its_renames_is_finished_or_undone(tmp_path: Path) -> None:
    """--force moves the earlier merge aside, the new one into place, then deletes the earlier one: a crash
    between the renames leaves no output. The next run finishes that commit, or puts the earlier one back."""
    from hubmerge.writer import old_dir

    models = [str(save_model(tmp_path / f"m{i}", random_tensors(i))) for i in range(2)]
    out = tmp_path / "out"
    first = hubmerge.merge({"method": "centroid", "models": models}, out)
    earlier = (out / "model.safetensors").read_bytes()
    linear = {"method": "linear", "models": models, "parameters": {"t": 0.9}}
    newer = hubmerge.merge(linear, tmp_path / "newer").out
    # Cut after the first rename, the finished merge (journal dropped) beside it: it takes the name.
    os.rename(out, old_dir(out))
    shutil.copytree(newer, tmp_path / ".out.hubmerge-partial")
    assert (
        hubmerge.plan(linear).recipe_sha256
        == json.loads((newer / "hubmerge.json").read_text())["recipe_sha256"]
    )
    with pytest.raises(OutputError, match="already exists"):  # recovered first, then refused without --force
        hubmerge.merge(linear, out)
    assert (out / "model.safetensors").read_bytes() == (newer / "model.safetensors").read_bytes()
    assert not old_dir(out).exists() and not (tmp_path / ".out.hubmerge-partial").exists()
    # Cut with the new merge unfinished (its journal still there): the earlier merge is put back.
    shutil.rmtree(out)
    shutil.copytree(first.out.parent / "newer", out)  # any earlier merge
    os.rename(out, old_dir(out))
    (tmp_path / ".out.hubmerge-partial" / ".hubmerge-progress").mkdir(parents=True)
    hubmerge.merge({"method": "centroid", "models": models}, out, force=True)
    assert (out / "model.safetensors").read_bytes() == earlier and not old_dir(out).exists()
    # A folder of the user's by that name (no hubmerge.json: no merge moved aside) is left alone.
    old_dir(out).mkdir()
    (old_dir(out) / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        hubmerge.merge({"method": "centroid", "models": models}, out)
    assert (old_dir(out) / "notes.txt").read_text() == "mine"


def test_a_merge_in_a_program_leaves_its_process_settings_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command may tune malloc and the collector for its merge; a program's merge() must not: those
    settings are process-wide (its other threads), and malloc's adaptive thresholds cannot be put back. Two
    merges at once put torch's thread count back as the program had it."""
    import gc
    import threading

    from hubmerge.sources import buffers

    calls: list[str] = []

    class Libc:
        def mallopt(self, *args: int) -> None:
            calls.append("mallopt")

        def malloc_trim(self, *args: int) -> None:
            calls.append("trim")

    monkeypatch.setattr(buffers, "_LIBC", Libc())
    models = [str(save_model(tmp_path / f"m{i}", random_tensors(i))) for i in range(2)]
    seen: list[bool] = []
    hubmerge.merge(
        {"method": "centroid", "models": models},
        tmp_path / "a",
        progress=lambda n: seen.append(gc.isenabled()),
    )
    assert calls == [] and seen and all(seen)
    monkeypatch.setattr(buffers, "OWN_PROCESS", True)  # as the command runs it
    hubmerge.merge({"method": "centroid", "models": models}, tmp_path / "b")
    assert "mallopt" in calls and calls[-1] == "trim"
    # Two merges in threads, the second starting while the first runs: torch's count is the program's after.
    before = torch.get_num_threads()
    started, finish = threading.Event(), threading.Event()

    def slow(n: int) -> None:
        started.set()
        finish.wait(5)

    first = threading.Thread(
        target=hubmerge.merge,
        args=({"method": "centroid", "models": models}, tmp_path / "c"),
        kwargs={"progress": slow},
    )
    first.start()
    started.wait(5)
    second = hubmerge.merge({"method": "linear", "models": models, "parameters": {"t": 0.3}}, tmp_path / "d")
    finish.set()
    first.join()
    assert second.out.exists() and (tmp_path / "c" / "model.safetensors").exists()
    assert torch.get_num_threads() == before
    fresh: list[int] = []
    thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert fresh == [before]


def test_the_cards_snippet_loads_a_tokenizer_only_where_the_output_has_one(tmp_path: Path) -> None:
    models = [save_model(tmp_path / f"m{i}", random_tensors(i)) for i in range(2)]
    recipe = {"method": "centroid", "models": [str(m) for m in models]}
    bare = (hubmerge.merge(recipe, tmp_path / "bare").out / "README.md").read_text()
    assert "AutoTokenizer" not in bare and 'model = AutoModel.from_pretrained("./bare")' in bare
    (models[0] / "tokenizer.json").write_text("{}")
    (models[0] / "tokenizer_config.json").write_text("{}")
    with_tokenizer = (hubmerge.merge(recipe, tmp_path / "tok").out / "README.md").read_text()
    assert 'tokenizer = AutoTokenizer.from_pretrained("./tok")' in with_tokenizer


def test_the_working_directory_is_no_output(
    tmp_path: Path, three: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--out .` in an empty folder: the finished merge is renamed into place, which would leave the shell in
    a deleted folder that shows none of the files."""
    here = tmp_path / "here"
    (here / "deeper").mkdir(parents=True)
    recipe = {"method": "centroid", "models": [str(p) for p in three]}
    for cwd in (here, here / "deeper"):
        monkeypatch.chdir(cwd)
        with pytest.raises(OutputError, match="is \\(or contains\\) the working directory") as info:
            hubmerge.merge(recipe, here)
        assert info.value.hint == "give `out` the name of a new folder, or run from another directory"
    assert (here / "deeper").is_dir() and not list(tmp_path.glob(".here*"))
    assert (hubmerge.merge(recipe, "merged").out / "model.safetensors").is_file()  # relative to it: fine


def test_a_resume_reports_the_earlier_runs_bytes_first_in_one_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """So that a progress bar shows them done without counting them in its rate (a resume once showed
    13 GB/s); the calls still add up to the input bytes."""
    from hubmerge.cli import _LogProgress

    recipe, out = _two_model_recipe(tmp_path), tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER, str(recipe), "3", str(out)], capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL
    calls: list[int] = []
    done = hubmerge.merge(recipe, out, resume=True, progress=calls.append)
    assert done.resumed_bytes > 0 and calls[0] == done.resumed_bytes
    assert sum(calls) == done.plan.bytes_read
    calls.clear()  # a fresh run's first call: nothing merged before
    fresh = hubmerge.merge(recipe, tmp_path / "fresh", progress=calls.append)
    assert calls[0] == 0 and len(calls) > 1 and sum(calls) == fresh.plan.bytes_read
    log = _LogProgress(10**10, every=0.0, initial=9 * 10**9)
    log.start -= 1.0  # a second for the last GB: 1 GB/s, not 10
    log.update(10**9)
    said = capsys.readouterr().err
    assert "merging: 100% (9.3 GiB of 9.3 GiB, 1.00 GB/s, 1 s)" in said, said


def test_an_empty_output_written_to_while_merging_keeps_the_merge_for_a_resume(
    tmp_path: Path, three: list[Path]
) -> None:
    """The folder was there, empty (it takes the output without force): written to meanwhile, the merge is
    kept with its journal, and the hint is one that works (force would be refused: no earlier merge)."""
    recipe = {"method": "centroid", "models": [str(p) for p in three]}
    out = tmp_path / "out"
    out.mkdir()

    def write_there(plan: object) -> None:
        (out / "notes.txt").write_text("mine")

    with pytest.raises(OutputError, match="was created or written to while merging") as info:
        hubmerge.merge(recipe, out, on_plan=write_there)
    assert info.value.hint is not None and "rerun with resume=True" in info.value.hint
    assert "force" not in info.value.hint and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    done = hubmerge.merge(recipe, out, resume=True)
    assert done.resumed_tensors == len(done.plan.jobs) and (out / "model.safetensors").is_file()
