"""What is benchmarked: each method as one row of data, and how each tool is told to run it.

One case is (family, method). The three tools get equivalent instructions: a hubmerge recipe, a mergekit
config with the same models, weights and densities, and for the floor the weighted sum of the same inputs
(for linear methods exactly the same arithmetic; for the others a reference for the cost of reading the inputs
and writing the output once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Method:
    """A benchmarked method: which fine-tunes it merges, with what, and the floor's coefficients."""

    name: str
    tunes: tuple[int, ...]  # fine-tune indices (1-based) merged
    base: bool  # reads the base model too
    weights: tuple[float, ...] | None  # per-model weight, None: the method's default
    density: float | None
    parameters: dict[str, Any] = field(default_factory=dict)  # hubmerge's method-wide parameters
    mergekit: str = ""  # mergekit's merge_method
    mergekit_parameters: dict[str, Any] = field(default_factory=dict)
    linear: bool = False  # the floor computes exactly this merge

    def floor_coefficients(self) -> list[float]:
        """Coefficients of [base?, tunes...] for the floor's weighted sum."""
        n = len(self.tunes)
        if self.name == "linear":
            t = float(self.parameters["t"])
            return [1 - t, t]
        if self.name == "weighted":
            ws = list(self.weights or [1.0] * n)
            return [w / sum(ws) for w in ws]
        if self.name in ("centroid", "slerp"):
            return [1 / n] * n
        ws = list(self.weights or [1.0] * n)
        return [1 - sum(ws), *ws]


_TASK = dict(tunes=(1, 2, 3), base=True)
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("linear", (1, 2), False, None, None, {"t": 0.5}, "linear", linear=True),
        Method("weighted", (1, 2, 3), False, (1.0, 2.0, 3.0), None, {}, "linear", linear=True),
        Method("centroid", (1, 2, 3), False, None, None, {}, "linear", linear=True),
        Method(
            "task_arithmetic",
            **_TASK,
            weights=(0.5, 0.5, 0.5),
            density=None,
            parameters={"normalize": False},
            mergekit="task_arithmetic",
            mergekit_parameters={"normalize": False},
            linear=True,
        ),
        Method("ties", **_TASK, weights=(1.0, 1.0, 1.0), density=0.5, mergekit="ties"),
        Method(
            "dare_ties",
            **_TASK,
            weights=(1.0, 1.0, 1.0),
            density=0.5,
            mergekit="dare_ties",
            mergekit_parameters={
                "normalize": True
            },  # hubmerge's default; mergekit's is false: the same merge
        ),
        Method("dare_linear", **_TASK, weights=(0.5, 0.5, 0.5), density=0.5, mergekit="dare_linear"),
        Method("slerp", (1, 2), False, None, None, {"t": 0.5}, "slerp"),
        Method("model_stock", **_TASK, weights=None, density=None, mergekit="model_stock"),
    )
}
MAIN_METHODS = ("linear", "weighted", "centroid", "task_arithmetic", "ties", "dare_ties")


def inputs(method: Method, dirs: list[Path]) -> list[Path]:
    """The model directories a case reads, base first when it has one."""
    return [*([dirs[0]] if method.base else []), *(dirs[t] for t in method.tunes)]


def model_ref(path: Path, source: str) -> dict[str, str]:
    """How a recipe names a model. The Hub path has its own script, bench/hub.py (a local Hub server, then
    the same merge from local files, by ranged reads, by shard downloads, and with --push)."""
    if source == "local":
        return {"path": str(path)}
    raise SystemExit("the Hub path is measured by bench/hub.py (make bench runs it after the local cases)")


def hubmerge_recipe(method: Method, dirs: list[Path], source: str) -> dict[str, Any]:
    """The hubmerge recipe for a case."""
    models = []
    for k, t in enumerate(method.tunes):
        entry: dict[str, Any] = model_ref(dirs[t], source)
        if method.weights is not None:
            entry["weight"] = method.weights[k]
        if method.density is not None:
            entry["density"] = method.density
        models.append(entry)
    recipe: dict[str, Any] = {"method": method.name, "models": models, "dtype": "bfloat16"}
    if method.base:
        recipe["base"] = model_ref(dirs[0], source)
    recipe["parameters"] = dict(method.parameters)
    return recipe


def mergekit_config(method: Method, dirs: list[Path]) -> dict[str, Any]:
    """The equivalent mergekit config."""
    models: list[dict[str, Any]] = []
    weights = list(method.weights or [1.0] * len(method.tunes))
    if method.name == "linear":
        weights = [1 - method.parameters["t"], method.parameters["t"]]
    for k, t in enumerate(method.tunes):
        params: dict[str, Any] = {}
        if method.mergekit not in ("slerp", "model_stock"):
            params["weight"] = weights[k]
        if method.density is not None:
            params["density"] = method.density
        models.append({"model": str(dirs[t]), **({"parameters": params} if params else {})})
    config: dict[str, Any] = {"merge_method": method.mergekit, "models": models, "dtype": "bfloat16"}
    if method.base:
        config["base_model"] = str(dirs[0])
    if method.mergekit == "slerp":
        # mergekit's slerp goes from base_model to the other model.
        config["base_model"] = str(dirs[method.tunes[0]])
        config["parameters"] = {"t": method.parameters["t"]}
    if method.mergekit_parameters:
        config["parameters"] = dict(method.mergekit_parameters)
    return config


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as YAML and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def commands(
    method: Method, dirs: list[Path], work: Path, *, source: str, device: str, mergekit: Path | None
) -> dict[str, list[str]]:
    """The command line of each tool for a case, writing into ``work/<tool>``."""
    import sys

    here = Path(__file__).resolve().parent
    recipe = write_yaml(work / "recipe.yaml", hubmerge_recipe(method, dirs, source))
    cmds = {
        "hubmerge": ["hubmerge", str(recipe), "--out", str(work / "hubmerge"), "--force", "-q"]
        + (["--device", device] if device != "cpu" else []),
        "floor": [
            sys.executable,
            str(here / "floor.py"),
            str(work / "floor.safetensors"),
            *(f"{c!r}:{d}" for c, d in zip(method.floor_coefficients(), inputs(method, dirs), strict=True)),
        ],
    }
    if mergekit is not None and method.mergekit:
        config = write_yaml(work / "mergekit.yml", mergekit_config(method, dirs))
        cmds["mergekit"] = [
            str(mergekit),
            str(config),
            str(work / "mergekit"),
            "--no-copy-tokenizer",
            "--lazy-unpickle",
            "--quiet",
            "--random-seed",
            "0",
        ] + (["--cuda"] if device == "cuda" else [])
    return cmds
