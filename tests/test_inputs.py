"""Bad input gets a clear error naming the file, tensor or recipe field; nothing is written."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hubmerge
from hubmerge.errors import HeaderError, PlanError, RecipeError, SourceError
from hubmerge.methods import get_method
from hubmerge.params import resolve_params
from hubmerge.refs import ModelRef
from hubmerge.sources.local import LocalSource

from .util import random_tensors, save_model

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def _recipe_error(doc: object, match: str, path: str | None = None) -> RecipeError:
    with pytest.raises(RecipeError, match=match) as info:
        hubmerge.load_recipe(doc)  # type: ignore[arg-type]
    if path is not None:
        assert info.value.path == path
    return info.value


@pytest.fixture()
def pair(tmp_path: Path) -> list[str]:
    return [str(save_model(tmp_path / n, random_tensors(i))) for i, n in enumerate("ab")]


def test_recipe_errors_name_the_field(pair: list[str]) -> None:
    _recipe_error({"method": "avg", "models": pair}, "unknown method 'avg'", "method")
    err = _recipe_error({"method": "avg", "models": pair}, "unknown method")
    assert err.hint is not None and "centroid" in err.hint and "ties" in err.hint
    _recipe_error({"method": "linear", "models": pair}, "needs parameter 't'", "parameters.t")
    _recipe_error(
        {"method": "linear", "models": pair, "parameters": {"t": "x"}}, "is a number", "parameters.t"
    )
    _recipe_error(
        {"method": "centroid", "models": pair, "parameters": {"t": 0.5}},
        "takes no parameter 't'",
        "parameters.t",
    )
    _recipe_error(
        {"method": "weighted", "models": [{"path": pair[0], "weight": "heavy"}, pair[1]]},
        "expected a number, got 'heavy'",
        "models.0.weight",
    )
    _recipe_error(
        {"method": "weighted", "models": pair, "parameters": {"weight": [1.0, 2.0, 3.0]}},
        "3 values for 'weight' but 2 models",
        "parameters.weight",
    )
    _recipe_error({"method": "linear", "models": [pair[0]], "parameters": {"t": 0.5}}, "exactly 2", "models")
    _recipe_error({"method": "ties", "models": pair}, "needs a base", "base")
    _recipe_error(
        {"method": "ties", "base": pair[0], "models": [{"path": pair[1], "density": 1.5}]},
        r"'density' must lie in \[0.0, 1.0\], got 1.5",
        "models.0.density",
    )
    _recipe_error({"method": "centroid", "models": pair, "dtype": "float13"}, "float13", "dtype")
    _recipe_error({"method": "centroid", "models": pair, "colour": 1}, "unknown key", "colour")
    misspelt = _recipe_error(
        {"method": "centroid", "models": [{"path": pair[0], "wieght": 2}, pair[1]]},
        "unknown key",
        "models.0.wieght",
    )
    assert misspelt.hint == "did you mean `weight`?"
    mergekit_style = _recipe_error(
        {"method": "centroid", "models": [{"model": pair[0]}, pair[1]]}, "unknown key", "models.0.model"
    )
    assert (
        mergekit_style.hint is not None
        and "`path:`" in mergekit_style.hint
        and "`repo:`" in mergekit_style.hint
    )
    _recipe_error(
        {"method": "centroid", "models": pair, "rules": [{"tensors": "x", "take": 5}]},
        "numbered 0 to 1",
        "rules.0.take",
    )
    _recipe_error(
        {"method": "centroid", "models": ["not a valid id!"]}, "neither an existing local path", "models.0"
    )
    _recipe_error(
        {"method": "centroid", "models": pair, "output": {"max_shard_size": "lots"}},
        "is not a size",
        "output.max_shard_size",
    )
    _recipe_error("method: [unclosed", "not valid YAML at line 1")
    _recipe_error(Path("/nonexistent/recipe.yaml"), "does not exist")


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"method": "linear", "parameters": {"t": float("nan")}}, "parameters.t"),
        ({"method": "linear", "parameters": {"t": float("inf")}}, "parameters.t"),
        ({"method": "weighted", "models": [{"weight": float("-inf")}, {}]}, "models.0.weight"),
        ({"method": "ties", "base": 1, "models": [{"density": float("nan")}, {}]}, "models.0.density"),
        ({"method": "weighted", "parameters": {"weight": [1.0, float("nan")]}}, "parameters.weight"),
        (
            {
                "method": "linear",
                "parameters": {"t": 0.5},
                "rules": [{"tensors": "x", "parameters": {"t": float("nan")}}],
            },
            "rules.0.parameters.t",
        ),
    ],
)
def test_numbers_that_are_not_finite_are_refused(pair: list[str], doc: dict[str, object], path: str) -> None:
    """NaN passes every range check (each comparison is false) and infinity fills the merge with NaN."""
    models = doc.get("models", [{}, {}])
    assert isinstance(models, list)
    doc = doc | {"models": [{"path": p} | m for p, m in zip(pair, models, strict=True)]}  # type: ignore[operator]
    if doc.get("base") == 1:
        doc["base"] = pair[0]
    _recipe_error(doc, "is not a finite number", path)


def test_recipe_text_files_and_numbers_read_as_meant(pair: list[str], tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-1 as a string; a recipe means the number.
    recipe = hubmerge.load_recipe(f"method: linear\nmodels: {pair}\nparameters: {{t: 1e-1}}\n")
    assert hubmerge.plan(recipe).recipe.parameters == {"t": "1e-1"}
    assert resolve_params(recipe, get_method("linear"), {}) == {"t": 0.1}
    # ... while a short commit SHA that looks like a number stays the text it is.
    sha = hubmerge.load_recipe(f"method: centroid\nmodels: [{{repo: a/b, revision: 5508e12}}, {pair[0]}]\n")
    assert sha.models[0].revision == "5508e12"
    _recipe_error(
        {"method": "linear", "models": pair, "parameters": {"t": "nan"}}, "is not a finite", "parameters.t"
    )
    huge = {"method": "linear", "models": pair, "parameters": {"t": 10**400}}
    _recipe_error(huge, "too large", "parameters.t")
    for beyond in (1e39, -3.5e38, "1e300"):  # finite in Python, infinite in the float32 the merge computes in
        doc = {"method": "linear", "models": pair, "parameters": {"t": beyond}}
        _recipe_error(doc, "beyond the range of float32", "parameters.t")
    weights = {
        "method": "weighted",
        "models": [{"path": pair[0], "weight": 1}, {"path": pair[1], "weight": 1e39}],
    }
    _recipe_error(weights, "beyond the range of float32", "models.1.weight")
    # slerp's eps is a distance from 1 of |cos|; DARE's seed is the recipe's, once.
    _recipe_error(
        {"method": "slerp", "models": pair, "parameters": {"t": 0.5, "eps": -0.1}},
        "must lie in",
        "parameters.eps",
    )
    seeded = {
        "method": "dare_linear",
        "base": pair[0],
        "models": [pair[1]],
        "rules": [{"tensors": "*", "parameters": {"seed": 9}}],
    }
    assert "parameters:" in (_recipe_error(seeded, "seed is set once", "rules.0.parameters.seed").hint or "")
    # YAML's `on:` is True, and `self` is no keyword of Recipe's: both are unknown keys, not a TypeError.
    _recipe_error(f"method: centroid\nmodels: {pair}\non: 1\n", "unknown key True", "True")
    _recipe_error({"method": "centroid", "models": pair, "self": 1}, "unknown key", "self")
    # A misspelt required key is named as such, not only as the missing one.
    misspelt = _recipe_error(f"modles: {pair}\nmethod: centroid\n", "unknown key", "modles")
    assert misspelt.hint == "did you mean `models`?"
    # A one-line string names a file (whatever its suffix), not YAML text.
    _recipe_error("recipe.json", "recipe file recipe.json does not exist")
    _recipe_error("nope", "recipe file nope does not exist")
    (tmp_path / "r.txt").write_text(f"method: centroid\nmodels: {pair}\n")
    assert hubmerge.load_recipe(str(tmp_path / "r.txt")).method == "centroid"
    (tmp_path / "empty.yaml").write_text("")
    _recipe_error(tmp_path / "empty.yaml", "the recipe is empty")
    _recipe_error(5, "a recipe is a path, YAML text, a dict or a Recipe, got int")
    # Booleans are no model index and no size.
    _recipe_error(
        {"method": "centroid", "models": pair, "rules": [{"tensors": "x", "take": True}]},
        "expected a model's number or `base`, got True",
        "rules.0.take",
    )
    _recipe_error(
        {"method": "centroid", "models": pair, "output": {"max_shard_size": True}},
        r"expected a number or text, got True",
        "output.max_shard_size",
    )
    sized = _recipe_error(
        {"method": "centroid", "models": pair, "output": {"max_shard_size": -5}}, "positive"
    )
    assert str(sized).count("-5") == 1


def test_recipe_paths_are_relative_to_the_recipe(tmp_path: Path) -> None:
    save_model(tmp_path / "models" / "a", random_tensors(0))
    (tmp_path / "r.yaml").write_text("method: centroid\nmodels: [models/a, {path: ./models/a}]\n")
    recipe = hubmerge.load_recipe(tmp_path / "r.yaml")
    assert recipe.model_refs() == [ModelRef(path=tmp_path / "models" / "a")] * 2
    hub = hubmerge.load_recipe(
        {
            "method": "centroid",
            "models": ["org/name@v1", "hf://org/x@main", {"repo": "org/y", "revision": "abc"}],
        }
    )
    assert [str(r) for r in hub.model_refs()] == ["org/name@v1", "org/x@main", "org/y@abc"]


def test_recipe_built_in_code(pair: list[str], tmp_path: Path) -> None:
    recipe = hubmerge.Recipe(
        method="linear",
        models=[{"path": pair[0]}, {"path": pair[1]}],  # type: ignore[list-item]
        parameters={"t": 0.0},
    )
    out = hubmerge.merge(recipe, tmp_path / "out").out
    assert (out / "model.safetensors").read_bytes()[8:] != b""


def test_mergekit_config_is_translated(pair: list[str]) -> None:
    recipe = hubmerge.load_recipe(
        "merge_method: linear\nmodels:\n"
        f"  - model: {pair[0]}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {pair[1]}\n    parameters: {{weight: 0.7}}\n"
        "parameters: {normalize: true, int8_mask: true}\ndtype: bfloat16\n"
    )
    assert recipe.method == "weighted" and recipe.dtype == "bfloat16"
    assert [m.parameters for m in recipe.models] == [{"weight": 0.3}, {"weight": 0.7}]
    slerp = hubmerge.load_recipe(
        f"merge_method: slerp\nbase_model: {pair[1]}\nmodels:\n  - model: {pair[0]}\n  - model: {pair[1]}\n"
        "parameters: {t: 0.25}\n"
    )
    assert [m.ref for m in slerp.models] == [pair[1], pair[0]]
    assert slerp.base is None and not hubmerge.plan(slerp).notices  # the first model gives config, tokenizer
    spelt = hubmerge.load_recipe(
        f"merge_method: slerp\nbase_model: {pair[1]}/\nmodels: [{{model: {pair[0]}}}, {{model: {pair[1]}}}]\n"
        "parameters: {t: 0.25}\n"
    )
    assert [m.ref for m in spelt.models] == [f"{pair[1]}/", pair[0]]  # `dir/` and `dir` are one model
    # mergekit's idiom lists the base among the models; its task-vector methods leave it out, and its
    # defaults (density 1.0; normalize true for ties only) hold where the config gives none.
    for method, normalize in (("ties", True), ("dare_ties", False), ("dare_linear", False)):
        listed = hubmerge.load_recipe(
            f"merge_method: {method}\nbase_model: {pair[1]}\nmodels:\n  - model: {pair[1]}\n"
            f"  - model: {pair[0]}\n    parameters: {{weight: 0.5}}\n"
        )
        assert [m.ref for m in listed.models] == [pair[0]] and listed.base is not None
        assert listed.parameters == {"normalize": normalize, "density": 1.0}
    stock = hubmerge.load_recipe(
        f"merge_method: model_stock\nbase_model: {pair[1]}\n"
        f"models: [{{model: {pair[1]}}}, {{model: {pair[0]}}}, {{model: {pair[0]}}}]\n"
    )
    assert [m.ref for m in stock.models] == [pair[0], pair[0]] and stock.parameters == {}
    given = hubmerge.load_recipe(
        f"merge_method: ties\nbase_model: {pair[1]}\nmodels: [{{model: {pair[0]}}}]\n"
        "parameters: {density: 0.3, normalize: false}\n"
    )
    assert given.parameters == {"normalize": False, "density": 0.3}
    _recipe_error({"merge_method": "linear", "slices": []}, "layer slicing", "slices")
    _recipe_error({"merge_method": "passthrough", "models": []}, "not supported", "merge_method")
    _recipe_error(
        {"merge_method": "linear", "models": [{"model": pair[0]}], "tokenizer_source": "union"},
        "tokenizer_source: union",
        "tokenizer_source",
    )
    _recipe_error(
        {"merge_method": "ties", "models": [{"model": pair[0], "parameters": {"density": [0.1, 0.5]}}]},
        "gradient",
        "models.0.parameters.density",
    )
    # mergekit's newer tokenizer spelling, and model_stock's default filter_wise, say what hubmerge does.
    newer = (
        f"merge_method: model_stock\nbase_model: {pair[1]}\n"
        f"models: [{{model: {pair[0]}}}, {{model: {pair[0]}}}]\n"
    )
    assert (
        hubmerge.load_recipe(
            newer + "tokenizer: {source: base}\nparameters: {filter_wise: false}\n"
        ).parameters
        == {}
    )
    _recipe_error(newer + "parameters: {filter_wise: true}\n", "filter_wise: true", "parameters.filter_wise")
    union = _recipe_error(newer + "tokenizer: {source: union}\n", "tokenizer merging", "tokenizer")
    template = _recipe_error(newer + "chat_template: chatml\n", "chat template", "chat_template")
    assert "chat template included" in (template.hint or "") and "tokenizer" in (union.hint or "")
    _recipe_error(newer + "out_dtype: fp16\n", "got 'fp16'; expected one of float32", "out_dtype")


def test_mergekit_configs_as_mergekit_reads_them(pair: list[str]) -> None:
    """rescale as each method merges, a misplaced weight refused as mergekit refuses it, mergekit's loose
    booleans and torch dtype names, the base as tokenizer source by its path, typos answered."""
    ties = f"merge_method: ties\nbase_model: {pair[1]}\nmodels: [{{model: {pair[0]}}}]\n"
    assert hubmerge.load_recipe(ties + "parameters: {rescale: false, normalize: 'true'}\n").parameters == {
        "normalize": True,
        "density": 1.0,
    }
    refused = _recipe_error(
        ties + "parameters: {rescale: true}\n", "rescale: true is not how", "parameters.rescale"
    )
    assert refused.hint is not None and "rescale: false" in refused.hint
    dare = ties.replace("ties", "dare_ties")
    assert hubmerge.load_recipe(dare + "parameters: {rescale: 1}\n")
    _recipe_error(dare + "parameters: {rescale: false}\n", "always rescales", "parameters.rescale")
    arithmetic = ties.replace("ties", "task_arithmetic")
    for value in ("true", "false"):  # nothing is trimmed: nothing to rescale
        assert hubmerge.load_recipe(arithmetic + f"parameters: {{rescale: {value}, normalize: 0}}\n")
    misplaced = _recipe_error(
        f"merge_method: task_arithmetic\nbase_model: {pair[1]}\n"
        f"models:\n  - model: {pair[0]}\n    weight: 0.2\n",
        "unknown key 'weight' in a mergekit model entry",
        "models.0.weight",
    )
    assert misplaced.hint == "mergekit takes it under `parameters:` (`parameters: {weight: ...}`)"
    typed = hubmerge.load_recipe(ties + f"dtype: torch.bfloat16\ntokenizer_source: {pair[1]}/\n")
    assert typed.dtype == "bfloat16"
    typo = _recipe_error(ties + "dtpye: float32\n", "unknown mergekit key 'dtpye'", "dtpye")
    assert typo.hint == "did you mean `dtype`?"
    anchor = _recipe_error(ties + "common: {weight: 1}\n", "unknown mergekit key 'common'", "common")
    assert anchor.hint is not None and "`x-common: &c {...}`" in anchor.hint
    unnamed = _recipe_error(ties.replace("merge_method", "merge_methd"), "no `merge_method:`", "merge_methd")
    assert unnamed.hint == "did you mean `merge_method` for `merge_methd`?"
    plural = _recipe_error(ties.replace("merge_method", "methods"), "no `merge_method:`", "merge_method")
    assert plural.hint is not None and "did you mean" not in plural.hint
    # pydantic's lax booleans, as mergekit 0.1.5 reads them
    for value in ("1.0", "'on'", "'Y'"):
        assert hubmerge.load_recipe(dare + f"parameters: {{rescale: {value}, int8_mask: 1}}\n")
        assert (
            hubmerge.load_recipe(ties + f"parameters: {{normalize: {value}}}\n").parameters["normalize"]
            is True
        )
    assert hubmerge.load_recipe(ties + "parameters: {rescale: 0.0}\n")
    stock = f"merge_method: model_stock\nbase_model: {pair[1]}\n"
    stock += f"models: [{{model: {pair[0]}}}, {{model: {pair[0]}}}]\n"
    assert hubmerge.load_recipe(stock + "parameters: {filter_wise: 0}\n")
    _recipe_error(
        arithmetic + "parameters: {rescale: banana}\n", "'rescale' is true or false", "parameters.rescale"
    )
    ours = _recipe_error(ties + "output: {dir: x}\n", "unknown mergekit key 'output'", "output")
    assert ours.hint is not None and "a key of hubmerge's own recipes" in ours.hint


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path: Path) -> None:
    recipe = hubmerge.load_recipe(path)
    assert recipe.models


def _corrupt(tmp_path: Path, mutate: object) -> Path:
    directory = save_model(tmp_path / "bad", random_tensors(0))
    file = directory / "model.safetensors"
    mutate(file)  # type: ignore[operator]
    return directory


def _rewrite_header(file: Path, edit: object) -> None:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)  # type: ignore[operator]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _open(directory: Path) -> None:
    LocalSource(ModelRef(path=directory), label="models.0").close()


def test_truncated_file(tmp_path: Path) -> None:
    directory = _corrupt(tmp_path, lambda f: f.write_bytes(f.read_bytes()[:-40]))
    with pytest.raises(HeaderError, match=r"model.safetensors: tensor '.*' ends at byte \d+ .* truncated"):
        _open(directory)


def test_tiny_file(tmp_path: Path) -> None:
    with pytest.raises(HeaderError, match="only 3 bytes"):
        _open(_corrupt(tmp_path, lambda f: f.write_bytes(b"abc")))


def test_header_length_beyond_file(tmp_path: Path) -> None:
    def grow(f: Path) -> None:
        raw = f.read_bytes()
        f.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])

    with pytest.raises(HeaderError, match="header declares .* bytes but the file has"):
        _open(_corrupt(tmp_path, grow))


def test_bad_json(tmp_path: Path) -> None:
    def garble(f: Path) -> None:
        raw = bytearray(f.read_bytes())
        raw[8] = ord("!")
        f.write_bytes(bytes(raw))

    with pytest.raises(HeaderError, match="not valid JSON"):
        _open(_corrupt(tmp_path, garble))


def test_overlapping_offsets(tmp_path: Path) -> None:
    def overlap(header: dict[str, dict[str, list[int]]]) -> None:
        header["layer.0.weight"]["data_offsets"] = list(header["layer.1.weight"]["data_offsets"])

    with pytest.raises(HeaderError, match="overlap"):
        _open(_corrupt(tmp_path, lambda f: _rewrite_header(f, overlap)))


def test_a_gap_in_the_data_or_bytes_after_it_are_refused_as_safetensors_refuses_them(tmp_path: Path) -> None:
    """Offsets that leave bytes to no tensor: the safetensors library refuses such a file ("invalid offset",
    "not fully covered"), so merging it would write weights nobody else reads the same way."""
    from safetensors import SafetensorError

    def shift_last(f: Path) -> None:  # the last tensor moved 8 bytes on, the file 8 bytes longer
        def edit(header: dict[str, dict[str, list[int]]]) -> None:
            name = max(header, key=lambda k: header[k]["data_offsets"][0] if k != "__metadata__" else -1)
            header[name]["data_offsets"] = [o + 8 for o in header[name]["data_offsets"]]

        _rewrite_header(f, edit)
        with f.open("ab") as out:
            out.write(b"\0" * 8)

    gap = _corrupt(tmp_path / "gap", shift_last)
    with pytest.raises(SafetensorError):
        load_file(str(gap / "model.safetensors"))
    with pytest.raises(
        HeaderError, match=r"8 bytes of the data section \(from byte \d+\) belong to no tensor"
    ) as info:
        _open(gap)
    assert info.value.hint is not None and "download or save it again" in info.value.hint
    tail = _corrupt(tmp_path / "tail", lambda f: f.write_bytes(f.read_bytes() + b"\0" * 16))
    with pytest.raises(SafetensorError):
        load_file(str(tail / "model.safetensors"))
    with pytest.raises(HeaderError, match="16 bytes follow the last tensor's data"):
        _open(tail)
    # A Hub listing without sizes: the header alone is checked (the reads past the end would fail instead).
    from hubmerge.sources.header import parse_header

    raw = (tail / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert parse_header(raw[8 : 8 + n], file="x", file_size=None).tensors


@pytest.mark.parametrize(
    "shard",
    ["../other/model.safetensors", "/etc/model.safetensors", "//etc/m.safetensors", "a/../../x.safetensors"],
)
def test_an_index_that_points_outside_the_model_folder_is_refused(tmp_path: Path, shard: str) -> None:
    directory = save_model(tmp_path / "m", random_tensors(0), shards=2)
    index = directory / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"][next(iter(doc["weight_map"]))] = shard
    index.write_text(json.dumps(doc))
    with pytest.raises(HeaderError, match="outside the model's folder"):
        _open(directory)


def test_offsets_that_do_not_match_the_shape(tmp_path: Path) -> None:
    def wrong(header: dict[str, dict[str, list[int]]]) -> None:
        begin, end = header["norm.weight"]["data_offsets"]
        header["norm.weight"]["data_offsets"] = [begin, end + 4]

    with pytest.raises(HeaderError, match=r"'norm.weight': shape \[8\] of F32 needs 32 bytes"):
        _open(_corrupt(tmp_path, lambda f: _rewrite_header(f, wrong)))


def test_missing_inputs_and_pickles(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        hubmerge.plan({"method": "centroid", "models": [str(tmp_path / "nope")]})
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    with pytest.raises(SourceError, match="pickle checkpoint") as info:
        hubmerge.plan({"method": "centroid", "models": [str(pickled)]})
    assert info.value.hint is not None and "convert it once" in info.value.hint
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no model.safetensors"):
        hubmerge.plan({"method": "centroid", "models": [str(empty)]})
    sharded = save_model(tmp_path / "sharded", random_tensors(0), shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SourceError, match="lists shard 'model-00002-of-00002.safetensors'"):
        hubmerge.plan({"method": "centroid", "models": [str(sharded)]})


def test_single_file_source(tmp_path: Path) -> None:
    directory = save_model(tmp_path / "m", random_tensors(0))
    plan = hubmerge.plan({"method": "centroid", "models": [str(directory / "model.safetensors")]})
    assert len(plan.jobs) == len(random_tensors(0))


def test_a_folder_with_both_a_single_file_and_an_index_is_read_as_transformers_reads_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stale ``model.safetensors`` next to shards (or stale shards next to it): transformers loads the
    single file, so the merge must merge that one, not the other."""
    both = save_model(tmp_path / "both", random_tensors(0), shards=2)
    single = random_tensors(5)
    save_model(tmp_path / "single", single)
    (tmp_path / "single" / "model.safetensors").rename(both / "model.safetensors")
    out = hubmerge.merge({"method": "centroid", "models": [str(both), str(both)]}, tmp_path / "out").out
    merged = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(merged["layer.0.weight"], single["layer.0.weight"])
    assert "holds both model.safetensors and model.safetensors.index.json" in caplog.text


@pytest.mark.parametrize(
    ("fields", "path", "said"),
    [
        ({"method": "centroid", "models": ["a"], "modles": 1}, "modles", "unknown key"),
        ({"method": "centroid", "models": ["a"], "dtype": "fp16"}, "dtype", "'fp16'"),
        ({"models": ["a"]}, "method", "required field is missing"),
        ({"method": "linear", "models": ["a", "b"], "parameters": {"t": None}}, "parameters.t", "got None"),
        (
            {"method": "linear", "models": ["a", "b"], "parameters": {"t": {"x": 1}}},
            "parameters.t",
            "a number",
        ),
    ],
)
def test_a_recipe_built_in_code_raises_a_recipe_error_naming_the_field(
    fields: dict[str, object], path: str, said: str
) -> None:
    """Recipe(...) reports a wrong field as load_recipe does, not as pydantic's multi-line ValidationError."""
    with pytest.raises(RecipeError, match=said) as info:
        hubmerge.Recipe(**fields)
    assert info.value.path == path
    if path == "parameters.t":
        assert ": expected true or false, a number, text or a list" in info.value.message


def test_the_api_takes_what_the_cli_takes_and_refuses_bad_arguments_with_its_errors(tmp_path: Path) -> None:
    models = [save_model(tmp_path / f"m{i}", random_tensors(i)) for i in range(2)]
    recipe = hubmerge.load_recipe({"method": "centroid", "models": ["m0", "m1"]}, base_dir=str(tmp_path))
    assert [r.path for r in recipe.model_refs()] == models
    for bad in (0, -1, True):
        with pytest.raises(RecipeError, match="memory_budget is a positive number of bytes"):
            hubmerge.plan(recipe, memory_budget=bad)  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="transfer is 'ranges' or 'shards', got 'ftp'"):
        hubmerge.merge(recipe, tmp_path / "out", transfer="ftp")  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
    # What a notebook cell shows: a summary, not every job of the plan.
    result = hubmerge.merge(recipe, tmp_path / "out")
    shown = repr(result)
    assert shown.startswith(f"MergeResult(out='{tmp_path / 'out'}', tensors={len(result.plan.jobs)}, ")
    assert (
        repr(result.plan).startswith("MergePlan(method='centroid', sources=[")
        and len(repr(result.plan)) < 400
    )


def test_the_plan_says_what_a_user_may_not_mean(tmp_path: Path, pair: list[str]) -> None:
    """A model listed twice, a base among the models, a base the method does not merge, a tensor larger
    than max_shard_size: each merges, with a notice in the plan."""
    twice = hubmerge.plan({"method": "weighted", "models": [pair[0], pair[0] + "/", pair[1]]})
    assert any("models.1 is models.0 again" in n and "counts twice" in n for n in twice.notices), (
        twice.notices
    )
    same = hubmerge.plan({"method": "task_arithmetic", "base": pair[0], "models": [pair[1], pair[0]]})
    assert any("models.1 is the base" in n and "task vector is zero" in n for n in same.notices), same.notices
    recipe = {"method": "centroid", "base": pair[1], "models": pair, "output": {"max_shard_size": 100}}
    unused = hubmerge.plan(recipe)
    assert any("merges no base" in n and "config and" in n for n in unused.notices), unused.notices
    big = [n for n in unused.notices if "larger than max_shard_size (100)" in n]
    assert big and "a shard of its own" in big[0], unused.notices
    card = (hubmerge.merge(recipe, tmp_path / "out").out / "README.md").read_text()
    assert "| base (config and tokenizer only) |" in card
    plain = hubmerge.plan({"method": "centroid", "models": pair})
    assert not plain.notices


def test_one_value_given_two_ways_or_a_local_path_with_a_revision_is_refused(pair: list[str]) -> None:
    listed = {
        "method": "weighted",
        "models": [{"path": pair[0], "weight": 5}, pair[1]],
        "parameters": {"weight": [1, 2]},
    }
    error = _recipe_error(listed, "'weight' is given twice for model 0", "models.0.weight")
    assert "one way" in (error.hint or "")
    scalar = {
        "method": "weighted",
        "models": [{"path": pair[0], "weight": 5}, pair[1]],
        "parameters": {"weight": 2},
    }
    assert hubmerge.load_recipe(scalar)  # a default for all, overridden for one: fine
    _recipe_error(
        {"method": "centroid", "models": [{"path": pair[0], "revision": "main"}]}, "revision", "models.0"
    )
    _recipe_error({"method": "centroid", "models": [{"path": " "}]}, "empty path", "models.0.path")
    _recipe_error({"method": "centroid", "models": [""]}, "empty model reference", "models.0")


def test_a_folder_or_fifo_where_a_file_should_be_is_one_clear_error(tmp_path: Path) -> None:
    import os

    folder = tmp_path / "m"
    (folder / "model.safetensors").mkdir(parents=True)
    with pytest.raises(SourceError, match="no model.safetensors"):
        _open(folder)
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "model.safetensors")  # opening it to read would wait for a writer forever
    with pytest.raises(SourceError, match="no model.safetensors"):
        _open(fifo)
    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(SourceError, match="is neither a file nor a folder"):
        LocalSource(ModelRef(path=tmp_path / "pipe.safetensors"), label="models.0")


def test_a_model_with_lora_named_tensors_of_its_own_is_a_model(tmp_path: Path) -> None:
    """Some models store LoRA weights beside their own: an adapter is PEFT's adapter file, or LoRA factors
    only (diffusers' LoRA files)."""
    lora = {"layer.lora_A.weight": torch.ones(2, 4), "layer.lora_B.weight": torch.ones(4, 2)}
    models = [
        str(save_model(tmp_path / f"m{i}", lora | {"layer.weight": torch.ones(4, 4)})) for i in range(2)
    ]
    assert hubmerge.plan({"method": "centroid", "models": models}).jobs
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (tmp_path / "m0" / "model.safetensors").rename(adapter / "adapter_model.safetensors")
    with pytest.raises(
        PlanError, match=r"models.0 \(.*adapter\) is a PEFT adapter \(adapter_model.safetensors\)"
    ):
        hubmerge.plan({"method": "centroid", "models": [str(adapter), models[1]]})
    diffusers = {"unet.x.lora.down.weight": torch.ones(2, 4), "unet.x.lora.up.weight": torch.ones(4, 2)}
    for only in (lora, diffusers):
        folder = save_model(tmp_path / f"only{len(str(only))}", only)
        with pytest.raises(PlanError, match=r"is a PEFT adapter \(model.safetensors\)"):
            hubmerge.plan({"method": "centroid", "models": [str(folder), str(folder)]})


@pytest.mark.parametrize(
    ("kind", "tensors"),
    [
        (
            "fp8",
            {
                "proj.weight": torch.randn(4, 4).to(torch.float8_e4m3fn),
                "proj.weight_scale_inv": torch.rand(1, 1),
                "norm.weight": torch.ones(4),
            },
        ),
        (
            "gptq",
            {
                "proj.qweight": torch.randint(0, 2**30, (1, 4), dtype=torch.int32),
                "proj.qzeros": torch.randint(0, 2**30, (1, 1), dtype=torch.int32),
                "proj.scales": torch.rand(1, 4, dtype=torch.float16),
                "proj.g_idx": torch.zeros(4, dtype=torch.int32),
            },
        ),
        (
            "nf4",
            {
                "proj.weight": torch.randint(0, 255, (8, 1), dtype=torch.uint8),
                "proj.weight.absmax": torch.rand(1),
                "proj.weight.quant_state.bitsandbytes__nf4": torch.zeros(8, dtype=torch.uint8),
            },
        ),
    ],
)
def test_quantized_checkpoints_are_refused_before_any_read(
    tmp_path: Path, kind: str, tensors: dict[str, torch.Tensor]
) -> None:
    """Codes averaged with codes and scales with scales are not the merged weights (an FP8 pair merged so
    was off by 55% once dequantized): refused, naming a quantizer's tensor."""
    models = [str(save_model(tmp_path / f"{kind}{i}", tensors)) for i in range(2)]
    with pytest.raises(PlanError, match=r"models\.0 .* is a quantized checkpoint: proj\.") as info:
        hubmerge.plan({"method": "centroid", "models": models})
    assert (
        info.value.hint == "merge the unquantized checkpoints (bfloat16 or float16), then quantize the merge"
    )


def test_float_weights_named_like_scales_are_a_model(tmp_path: Path) -> None:
    tensors = [{"layer.weight": torch.randn(4, 4), "layer.weight_scale": torch.rand(4)} for _ in range(2)]
    models = [str(save_model(tmp_path / f"m{i}", t)) for i, t in enumerate(tensors)]
    merged = load_file(
        hubmerge.merge({"method": "centroid", "models": models}, tmp_path / "out").out / "model.safetensors"
    )
    torch.testing.assert_close(
        merged["layer.weight_scale"],
        (tensors[0]["layer.weight_scale"] + tensors[1]["layer.weight_scale"]) / 2,
    )


def test_a_pickle_checkpoint_is_converted_by_its_own_class_or_tensor_by_tensor(tmp_path: Path) -> None:
    """AutoModel would load a causal LM's bare backbone and save it without lm_head and the `model.` prefix:
    the conversion the hint gives loads the class config.json names (test_transformers runs it)."""
    folder = tmp_path / "llama"
    folder.mkdir()
    torch.save({"lm_head.weight": torch.zeros(2, 2)}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(SourceError, match="pytorch_model.bin is a pickle checkpoint") as info:
        hubmerge.plan({"method": "centroid", "models": [str(folder)]})
    hint = info.value.hint or ""
    assert "AutoModel" not in hint and "\n" not in hint
    assert (
        f"LlamaForCausalLM.from_pretrained('{folder}', torch_dtype='auto')"
        f".save_pretrained('{tmp_path / 'llama-safetensors'}')" in hint
    )
    # Without a class to load it by (no config.json), the state dict is saved as it is, names and all.
    (folder / "config.json").unlink()
    with pytest.raises(SourceError, match="pickle checkpoint") as info:
        hubmerge.plan({"method": "centroid", "models": [str(folder / "pytorch_model.bin")]})
    command = (info.value.hint or "").split('python -c "')[1].split('"')[0]
    exec(command, {})  # what the user would run: the folder is this test's own
    converted = load_file(str(folder / "pytorch_model.safetensors"))
    assert list(converted) == ["lm_head.weight"]
    assert hubmerge.plan({"method": "centroid", "models": [str(folder / "pytorch_model.safetensors")]}).jobs


@pytest.mark.parametrize("dtype", ["float8_e8m0fnu", "float4_e2m1fn_x2", "complex64"])
def test_a_valid_safetensors_dtype_hubmerge_does_not_support_is_named_as_such(
    tmp_path: Path, dtype: str
) -> None:
    """The installed safetensors writes these dtypes (MXFP4's scales and values, complex numbers): such a file
    is valid, and the error must not call it corrupt."""
    from safetensors.torch import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    odd = torch.zeros(2, 8, dtype=torch.uint8).view(getattr(torch, dtype))
    save_file({"scales": odd, "weight": torch.ones(2, 4)}, str(folder / "model.safetensors"))
    with pytest.raises(
        HeaderError, match=r"model.safetensors: tensor 'scales': hubmerge does not support"
    ) as info:
        _open(folder)
    assert "corrupt" not in str(info.value) and "convert the checkpoint" in (info.value.hint or "")


@pytest.mark.parametrize("dtype", ["F12", ["F32"], None])
def test_a_dtype_safetensors_does_not_know_is_still_a_corrupt_file(tmp_path: Path, dtype: object) -> None:
    def edit(header: dict[str, dict[str, object]]) -> None:
        header["norm.weight"]["dtype"] = dtype

    with pytest.raises(HeaderError, match=r"'norm.weight': unknown dtype") as info:
        _open(_corrupt(tmp_path, lambda f: _rewrite_header(f, edit)))
    assert "corrupt or not written by safetensors" in (info.value.hint or "")


def test_shards_without_their_index_say_the_index_is_missing(tmp_path: Path) -> None:
    """One shard of a `-of-N` set is a part of the model: the hint must not be to point the recipe at it."""
    sharded = save_model(tmp_path / "sharded", random_tensors(0), shards=3)
    (sharded / "model.safetensors.index.json").unlink()
    with pytest.raises(SourceError, match="holds the 3 shards of a checkpoint") as info:
        _open(sharded)
    hint = info.value.hint or ""
    assert "the index is missing: download model.safetensors.index.json again" in hint
    assert "point the recipe" not in hint and "one file" not in hint
    (sharded / "model-00003-of-00003.safetensors").unlink()
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        SourceError, match=r"holds 1 of the 3 shards .* and no model.safetensors.index.json"
    ) as info:
        _open(sharded)  # a lone shard is not the model either
    assert "the index and 2 shards are missing" in (info.value.hint or "")
    # Files that are not shards of one set: one of them may well be the model.
    (sharded / "model-00001-of-00003.safetensors").rename(sharded / "a.safetensors")
    save_model(tmp_path / "b", random_tensors(1))
    (tmp_path / "b" / "model.safetensors").rename(sharded / "b.safetensors")
    with pytest.raises(SourceError, match="holds 2 .safetensors files") as info:
        _open(sharded)
    assert "point the recipe at the one file" in (info.value.hint or "")
    whole = save_model(tmp_path / "whole", random_tensors(0))
    (whole / "model.safetensors").rename(whole / "model-00001-of-00001.safetensors")
    _open(whole)


def test_repo_takes_hub_ids_and_says_path_takes_local_folders(tmp_path: Path, pair: list[str]) -> None:
    """`repo: ./llama_b` was "neither an existing local path nor a Hub repository id" where it exists: it is a
    path, which `path:` takes. `repo: llama_b` names the Hub even where a folder llama_b exists (test_hub:
    the error names that folder if the Hub lacks the repository)."""
    for given in ("./a", "../a", str(tmp_path / "a"), "~/a"):
        error = _recipe_error(
            {"method": "centroid", "models": [pair[0], {"repo": given}]}, "`repo:` takes a Hub repository id"
        )
        assert error.path == "models.1.repo" and "is a local path" in error.message
        assert error.hint == f"for a local folder or file write `path: {given}` instead of `repo:`"
    error = _recipe_error(
        {"method": "centroid", "models": [pair[0], {"repo": "my model"}]},
        r"`repo:` takes a Hub repository id \(name or namespace/name\[@revision\]\), and 'my model' is not",
        "models.1.repo",
    )
    assert "`path:`" in (error.hint or "")
    from hubmerge.refs import hub_ref

    assert hub_ref("a", field="models.1.repo", base_dir=tmp_path).local == tmp_path / "a"  # pair's folder
    assert hub_ref("org/x@v1", field="models.1.repo", base_dir=tmp_path) == ModelRef(
        repo_id="org/x", revision="v1"
    )
    assert hub_ref("org/x", field="models.1.repo", base_dir=tmp_path).local is None  # no such folder


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef":  # a mapping's first line: its address range, its file
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_a_merged_tensors_pages_leave_the_resident_size(tmp_path: Path) -> None:
    """Mapped inputs stayed resident for the whole merge: `top` showed 20 GB for three 8B models whose merge
    used 200 MB. Released once merged, they stay in the page cache only."""
    folder = save_model(tmp_path / "m", {"big": torch.randn(1024, 1024), "small": torch.ones(3)})
    source = LocalSource(ModelRef(path=folder), label="models.0")
    try:
        info = source.tensors["big"]
        assert float(source.read(info).sum()) != 0.0  # every page read
        before = _mapped_kib(folder / "model.safetensors")
        assert before >= 4000
        source.release([info])
        assert _mapped_kib(folder / "model.safetensors") <= 8  # the header's page and the last, shared
        torch.testing.assert_close(source.read(info), load_file(folder / "model.safetensors")["big"])
    finally:
        source.close()
