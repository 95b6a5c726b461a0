"""Recipe fields read as written: what YAML or pydantic would take silently is refused, each refusal one line
naming the field, what was expected and what was found, with what to do."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hubmerge
from hubmerge.errors import PlanError, RecipeError
from hubmerge.recipe import parse_size

from .util import random_tensors, save_model


@pytest.fixture()
def pair(tmp_path: Path) -> list[str]:
    return [str(save_model(tmp_path / n, random_tensors(i))) for i, n in enumerate("ab")]


def _refused(doc: object) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        hubmerge.load_recipe(doc)  # type: ignore[arg-type]
    return info.value


def _said(doc: object) -> tuple[str | None, str, str | None]:
    """The refusal's field, message (without the field) and hint."""
    error = _refused(doc)
    message = error.message.removeprefix(f"recipe field '{error.path}': ")
    return error.path, message, error.hint


@pytest.mark.parametrize(
    ("text", "path", "lines"),
    [
        (
            "method: linear\nmodels: [{a}, {b}]\nparameters: {{t: 0}}\nparameters: {{t: 1}}\n",
            "parameters",
            "lines 3 and 4",
        ),
        ("method: centroid\nmodels: [{a}]\nmodels: [{a}, {b}]\n", "models", "lines 2 and 3"),
        (
            "method: weighted\nmodels:\n  - path: {a}\n    weight: 1\n    weight: 2\n",
            "models.0.weight",
            "lines 4 and 5",
        ),
        (
            "method: weighted\nmodels: [{{path: {a}, weight: 1, weight: 2}}, {b}]\n",
            "models.0.weight",
            "line 2",
        ),
        (
            "merge_method: linear\nmodels: [{{model: {a}}}]\ndtype: float16\ndtype: bfloat16\n",
            "dtype",
            "lines 3 and 4",
        ),
    ],
    ids=["parameters", "models", "a-model's-key", "on-one-line", "mergekit"],
)
def test_a_key_given_twice_is_refused_naming_both_lines(
    pair: list[str], text: str, path: str, lines: str
) -> None:
    """YAML keeps the last of two equal keys: a recipe edited twice merged with the value written last."""
    key = path.rsplit(".", 1)[-1]
    assert _said(text.format(a=pair[0], b=pair[1])) == (
        path,
        f"given twice ({lines})",
        f"keep one `{key}:`; YAML would silently use the last one",
    )


def test_merge_keys_still_give_defaults_a_mapping_overrides(pair: list[str]) -> None:
    """`<<: *anchor` copies the anchor's keys; the mapping's own key wins, which is what a merge key is for.
    A top-level `x-` key holds the anchor and is no recipe key."""
    recipe = hubmerge.load_recipe(
        f"x-common: &m {{weight: 2, density: 0.3}}\nmethod: ties\nbase: {pair[0]}\nmodels:\n"
        f"  - {{<<: *m, path: {pair[1]}, weight: 3}}\n  - {{<<: *m, path: {pair[1]}}}\n"
    )
    assert [(m.weight, m.density) for m in recipe.models] == [(3.0, 0.3), (2.0, 0.3)]
    assert "x-common" not in recipe.canonical_json()
    both = f"x-a: &a {{weight: 2}}\nx-b: &b {{weight: 5}}\nmethod: weighted\nmodels: [{pair[0]}, {pair[1]}]\n"
    assert hubmerge.load_recipe(both.replace(pair[0], f"{{<<: [*a, *b], path: {pair[0]}}}"))
    assert _said({"method": "centroid", "models": pair, "y-common": 1})[:2] == ("y-common", "unknown key")


@pytest.mark.parametrize(
    ("base", "path", "message", "hint"),
    [
        (
            {"weight": 5},
            "base.weight",
            "the base is not weighted: method 'task_arithmetic' weights the models' differences from it",
            "give the weights to the entries of `models:`, or remove it",
        ),
        (
            {"parameters": {"weight": 5}},
            "base.parameters.weight",
            "the base is not weighted: method 'task_arithmetic' weights the models' differences from it",
            "give the weights to the entries of `models:`, or remove it",
        ),
        (
            {"parameters": {"lambda": 3}},
            "base.parameters.lambda",
            "'lambda' applies to the whole merge, not to the base",
            "move it to the recipe's `parameters: {lambda: ...}`",
        ),
        (
            {"parameters": {"t": 3}},
            "base.parameters.t",
            "method 'task_arithmetic' takes no parameter 't'",
            "its parameters: weight, lambda, normalize; `hubmerge methods` describes them",
        ),
    ],
)
def test_the_base_takes_no_weight_and_no_parameters(
    pair: list[str], base: dict[str, object], path: str, message: str, hint: str
) -> None:
    """They were accepted and ignored: a task-vector method subtracts the base, weighting only the models."""
    doc = {"method": "task_arithmetic", "base": {"path": pair[0]} | base, "models": [pair[1]]}
    assert _said(doc) == (path, message, hint)


def test_the_base_of_other_methods_takes_none_either(pair: list[str]) -> None:
    ties = {"method": "ties", "base": {"path": pair[0], "density": 0.2}, "models": [pair[1]]}
    assert _said(ties) == (
        "base.density",
        "'density' is set per model, and the base is no model of the merge",
        "give `density:` to the entries of `models:`, or remove it",
    )
    centroid = {"method": "centroid", "base": {"path": pair[0], "weight": float("nan")}, "models": pair}
    assert _said(centroid)[:2] == (
        "base.weight",
        "the base is not weighted: method 'centroid' merges only `models:` (the base gives the config)",
    )
    dare = {
        "method": "dare_linear",
        "base": {"path": pair[0], "parameters": {"seed": 3}},
        "models": [pair[1]],
    }
    assert _said(dare)[:2] == (
        "base.parameters.seed",
        "seed is set once, for the whole recipe, not for the base",
    )


@pytest.mark.parametrize(
    ("entry", "method", "path", "message"),
    [
        ({"weight": True}, "weighted", "models.0.weight", "'weight' is a number, got True"),
        ({"weight": False}, "weighted", "models.0.weight", "'weight' is a number, got False"),
        ({"density": True}, "ties", "models.0.density", "'density' is a number, got True"),
        (
            {"parameters": {"weight": True}},
            "weighted",
            "models.0.parameters.weight",
            "'weight' is a number, got True",
        ),
        (
            {"parameters": {"density": False}},
            "ties",
            "models.0.parameters.density",
            "'density' is a number, got False",
        ),
    ],
)
def test_true_and_false_are_no_numbers_on_a_model_as_in_parameters(
    pair: list[str], entry: dict[str, object], method: str, path: str, message: str
) -> None:
    """pydantic read `weight: true` as 1.0, where `parameters: {weight: [true, 1]}` was refused."""
    doc = {"method": method, "base": pair[1], "models": [{"path": pair[0]} | entry, pair[1]]}
    if method == "weighted":
        del doc["base"]
    example = "1.0" if path.endswith("weight") else "0.5"
    assert _said(doc) == (path, message, f"give a number, such as {example}")
    listed = {"method": "weighted", "models": pair, "parameters": {"weight": [True, 1]}}
    assert _said(listed) == (
        "parameters.weight.0",
        "'weight' is a number, got True",
        "give a number, such as 1.0",
    )


def test_a_parameter_is_reported_where_it_was_written(pair: list[str]) -> None:
    nested = {"method": "weighted", "models": [{"path": pair[0], "parameters": {"weight": "x"}}, pair[1]]}
    assert _said(nested)[:2] == ("models.0.parameters.weight", "'weight' is a number, got 'x'")
    both = {
        "method": "weighted",
        "models": [{"path": pair[0], "weight": 1, "parameters": {"weight": 2}}, pair[1]],
    }
    assert _said(both) == (
        "models.0.weight",
        "'weight' is given twice: as `weight:` and in `parameters:`",
        "give it one way: `weight: 1.0`, or in `parameters: {weight: ...}`",
    )
    listed = {"method": "weighted", "models": pair, "parameters": {"weight": [1, -1]}}
    assert _said(listed) == (
        "parameters.weight",
        "the weights [1.0, -1.0] sum to 0, and `normalize` divides by their sum",
        "change the weights, or set `normalize: false`",
    )
    own = {"method": "weighted", "models": [{"path": pair[0], "weight": 1}, {"path": pair[1], "weight": -1}]}
    assert _said(own)[0] == "models"
    ruled = listed | {
        "parameters": {"normalize": False, "weight": [1, -1]},
        "rules": [{"tensors": "head.*", "parameters": {"normalize": True}}],
    }
    assert _said(ruled)[0] == "rules.0.parameters.normalize"


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ([], "an empty list of globs names no tensor"),
        ("", "an empty glob names no tensor, got ''"),
        (5, "expected a glob or a list of globs, got 5"),
        (["head.*", 5], "expected a glob or a list of globs, got ['head.*', 5]"),
    ],
)
def test_a_rule_names_its_tensors_with_globs(pair: list[str], tensors: object, message: str) -> None:
    """`tensors: []` was refused at plan time as a rule an earlier one shadows; `tensors: 5` asked for one
    value per model."""
    doc = {"method": "centroid", "models": pair, "rules": [{"tensors": tensors, "take": 0}]}
    path, said, hint = _said(doc)
    assert (path, said) == ("rules.0.tensors", message)
    assert hint is not None and hint.startswith("write e.g. `tensors: 'model.layers.*.mlp.*'`")


def test_seed_is_offered_only_by_the_methods_that_draw_random_numbers(pair: list[str]) -> None:
    def hint(method: str, models: list[str], params: dict[str, object]) -> str | None:
        base = {"base": pair[0]} if method.startswith(("dare", "ties")) else {}
        return _said({"method": method, "models": models, "parameters": params} | base)[2]

    assert hint("centroid", pair, {"t": 1}) == "'centroid' takes no parameters: remove it"
    assert hint("linear", pair, {"t": 0.5, "x": 1}) == "its parameters: t; `hubmerge methods` describes them"
    assert hint("ties", [pair[1]], {"x": 1}) == (
        "its parameters: weight, density, lambda, normalize; `hubmerge methods` describes them"
    )
    assert hint("dare_ties", [pair[1]], {"x": 1}) == (
        "its parameters: weight, density, lambda, normalize, seed; `hubmerge methods` describes them"
    )
    # A recipe's seed where it changes nothing is still accepted (recipes set it); one per model is not.
    assert hubmerge.load_recipe({"method": "centroid", "models": pair, "parameters": {"seed": 3}})
    said = hubmerge.plan({"method": "centroid", "models": pair, "parameters": {"seed": 3}}).notices
    assert "method 'centroid' draws no random numbers: `seed` changes nothing" in said
    assert not hubmerge.plan({"method": "dare_linear", "base": pair[0], "models": [pair[1]]}).notices
    per_model = {"method": "weighted", "models": [{"path": pair[0], "parameters": {"seed": 1}}, pair[1]]}
    assert _said(per_model) == (
        "models.0.parameters.seed",
        "method 'weighted' draws no random numbers: a seed changes nothing",
        "remove it",
    )


@pytest.mark.parametrize(
    ("field", "value", "path", "message", "hint"),
    [
        ("output", "out1", "output", "`output:` is a mapping, got 'out1'", "write `output: {dir: out1}`"),
        ("push", "org/x", "push", "`push:` is a mapping, got 'org/x'", "write `push: {repo: org/x}`"),
        ("card", 5, "card", "`card:` is a mapping, got 5", "write `card: {license: ...}`"),
        ("models", "./a", "models", "`models:` is a list, got './a'", "write e.g. `models: [./a, org/b]`"),
        (
            "models",
            [1, 2],
            "models.0",
            "a model is a path, a Hub id, or a mapping with `path:` or `repo:`, got 1",
            "write e.g. `./my-model`, `org/name@v1` or `{path: ./my-model, weight: 2}`",
        ),
        (
            "base",
            1,
            "base",
            "a model is a path, a Hub id, or a mapping with `path:` or `repo:`, got 1",
            "write e.g. `./my-model`, `org/name@v1` or `{path: ./my-model, weight: 2}`",
        ),
        ("card", {"tags": "x"}, "card.tags", "expected a list, got 'x'", "give a list"),
        (
            "models",
            [{"path": "a", "weight": "heavy"}],
            "models.0.weight",
            "expected a number, got 'heavy'",
            "give a number",
        ),
        (
            "compute_dtype",
            "half",
            "compute_dtype",
            "got 'half'; expected 'float32' or 'float64'",
            "give one of float32, float64",
        ),
        (
            "compute_dtype",
            "fp64",
            "compute_dtype",
            "got 'fp64'; expected 'float32' or 'float64'",
            "write `float64`",
        ),
        (
            "rules",
            [{"tensors": "x", "take": True}],
            "rules.0.take",
            "expected a model's number or `base`, got True",
            "write `take: 0` (the first model of `models:`) or `take: base`",
        ),
    ],
)
def test_a_wrong_type_is_said_in_the_recipes_words(
    pair: list[str], field: str, value: object, path: str, message: str, hint: str
) -> None:
    """Not pydantic's ("Input should be a valid dictionary or instance of Output")."""
    doc = {"method": "centroid", "models": pair} | {field: value}
    assert _said(doc) == (path, message, hint)


@pytest.mark.parametrize(
    ("given", "meant"),
    [("bf16", "bfloat16"), ("fp16", "float16"), ("f16", "float16"), ("fp32", "float32"), ("F32", "float32")],
)
def test_a_dtype_by_its_short_name_suggests_the_long_one(pair: list[str], given: str, meant: str) -> None:
    assert _said({"method": "centroid", "models": pair, "dtype": given}) == (
        "dtype",
        f"got {given!r}; expected 'float32', 'float16', 'bfloat16' or 'float64'",
        f"write `{meant}`",
    )
    mergekit = (
        f"merge_method: linear\nmodels: [{{model: {pair[0]}}}, {{model: {pair[1]}}}]\nout_dtype: {given}\n"
    )
    assert _said(mergekit)[2] == f"write `{meant}`"


def test_anchor_keys_and_mergekits_int8_mask_are_accepted_and_ignored(pair: list[str]) -> None:
    config = f"merge_method: linear\nmodels: [{{model: {pair[0]}}}, {{model: {pair[1]}}}]\n"
    plain = hubmerge.load_recipe(config)
    for flag in ("true", "false"):
        recipe = hubmerge.load_recipe(config + f"int8_mask: {flag}\nx-note: &n 1\n")
        assert recipe.canonical_json() == plain.canonical_json()
    assert _said(config + "int8_mask: 8\n") == (
        "int8_mask",
        "'int8_mask' is true or false, got 8",
        "hubmerge ignores it (it saves memory only): remove it, or write true or false",
    )
    assert _said(config + "parameters: {int8_mask: fast}\n")[0] == "parameters.int8_mask"


def test_a_shard_size_in_numeric_text_is_a_number_of_bytes(pair: list[str]) -> None:
    """YAML 1.1 reads `1e9` as text, not as a number."""
    assert [parse_size(s) for s in ("1e9", "2.5e9", "1E3KB", 1e9, "5GB")] == [
        10**9,
        25 * 10**8,
        10**6,
        10**9,
        5 * 10**9,
    ]
    recipe = hubmerge.load_recipe(f"method: centroid\nmodels: [{pair[0]}]\noutput: {{max_shard_size: 1e9}}\n")
    assert recipe.output.max_shard_size == "1e9"
    for bad in ("1e", "e9", "1e9.5"):
        doc = {"method": "centroid", "models": pair, "output": {"max_shard_size": bad}}
        assert _said(doc) == (
            "output.max_shard_size",
            f"{bad!r} is not a size; write e.g. 5GB, 500MB or 2GiB",
            "give a number of bytes, or a size such as 5GB, 500MB or 2GiB",
        )


_NAMES = [
    *(f"model.layers.{i}.{p}.weight" for i in range(3) for p in ("mlp.up_proj", "self_attn.q_proj")),
    "lm_head.weight",
    "layer[0].weight",
]


@pytest.fixture()
def named(tmp_path: Path) -> str:
    """A model with a Llama's tensor names, and one whose name holds glob characters."""
    return str(save_model(tmp_path / "llama", {n: torch.ones(2, 2) for n in _NAMES}))


def _plan_hint(model: str, glob: str) -> str | None:
    with pytest.raises(
        PlanError, match=re.escape(f"does not apply as written: its glob {glob!r} matches no tensor")
    ) as info:
        hubmerge.plan(
            {"method": "centroid", "models": [model, model], "rules": [{"tensors": glob, "take": 0}]}
        )
    return info.value.hint


@pytest.mark.parametrize(
    ("glob", "meant"),
    [
        ("model.layer.*.mlp.*", "model.layers.*.mlp.*"),  # the layers' glob, not one layer's
        ("model.layers.?.mlp.up_prj.weight", "model.layers.?.mlp.up_proj.weight"),
        ("*.q_prj.*", "*.q_proj.*"),
        ("lm_haed.*", "lm_head.*"),
        ("model.layers.1.mlp_up_proj.weight", "model.layers.1.mlp.up_proj.weight"),
    ],
)
def test_a_misspelt_glob_is_answered_with_a_glob_like_it(named: str, glob: str, meant: str) -> None:
    """The hint once said to read `hubmerge plan --json`, which fails with the same error: it shows names."""
    hint = _plan_hint(named, glob)
    assert hint is not None and hint.startswith(
        f"did you mean {meant!r}? the models' tensors are named like '"
    )
    assert hint.endswith("(8 in all); fix the glob, or remove the rule") and "plan --json" not in hint
    shown = re.findall(r"'([^']+)'", hint.split("named like ")[1])
    assert len(shown) == 3 and all(s in _NAMES for s in shown)
    if meant.startswith("model.layers"):
        assert shown[0].startswith("model.layers")  # the names like the glob first


def test_brackets_in_a_tensor_name_are_escaped_in_its_glob(named: str) -> None:
    assert _plan_hint(named, "layer[0].weight") == (
        "`[...]` in a glob matches one of the characters inside: to match the brackets of a name, write "
        "'layer[[]0].weight' (a `[` as `[[]`) or 'layer?0?.weight'"
    )
    for escaped in ("layer[[]0].weight", "layer?0?.weight"):
        rule = {"tensors": escaped, "take": 0}
        assert hubmerge.plan({"method": "centroid", "models": [named, named], "rules": [rule]}).jobs


def test_paths_from_a_program_are_local_models(tmp_path: Path) -> None:
    """`Path` objects, as a program holds them: the shorthand, `path:` and `output.dir`."""
    for i in range(2):
        save_model(tmp_path / f"m{i}", random_tensors(i))
    recipe = hubmerge.Recipe(
        method="weighted",
        models=[tmp_path / "m0", {"path": tmp_path / "m1", "weight": 3.0}],
        output={"dir": tmp_path / "out"},
    )
    result = hubmerge.merge(recipe)
    assert result.out == tmp_path / "out"
    merged = load_file(result.out / "model.safetensors")
    first, second = random_tensors(0), random_tensors(1)
    for name, value in merged.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (first[name] + 3 * second[name]) / 4)


@pytest.mark.parametrize("glob", ["model.layers.3.mlp.*", "model.layers.12.*"])
def test_a_layer_past_the_last_says_the_range_not_another_layer(named: str, glob: str) -> None:
    """`model.layers.3.*` in a 3-layer model once drew `model.layers.*.*` or another layer: a rule over
    tensors it was not meant for."""
    number = glob.split(".")[2]
    assert _plan_hint(named, glob) == (
        f"the models have no model.layers.{number}: the last is model.layers.2; "
        "fix the glob, or remove the rule"
    )
    from hubmerge.globs import unmatched_glob_hint

    hybrid = [
        "model.layers.0.attn.w",
        "model.layers.1.ssm.w",
        "model.layers.2.attn.w",
        "0.weight",
        "1.weight",
    ]
    for within in ("model.layers.1.attn.*", "5.weight"):  # a gap inside, or no prefix: no range claimed
        assert "the last is" not in unmatched_glob_hint(within, hybrid)


def test_a_shard_size_under_one_byte_says_so() -> None:
    for value in (0.5, "0.5B"):
        with pytest.raises(ValueError, match="a shard holds at least 1 byte"):
            parse_size(value)
    with pytest.raises(ValueError, match="size must be positive, got 0"):
        parse_size(0)
