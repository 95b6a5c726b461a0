"""The model card of a merge: YAML front matter the Hub understands, and a body that says what was merged.

The license is the sources' common license (read from their cards); when they disagree the user must choose.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import yaml

from . import __version__
from .errors import RecipeError
from .methods import get_method
from .params import resolve_params, seed_of
from .plan import MergePlan
from .sources import TensorSource

log = logging.getLogger(__name__)

PIPELINES = (
    ("ForCausalLM", "text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForImageClassification", "image-classification"),
)
_FRONT = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.DOTALL)


def card_metadata(card_text: str) -> dict[str, Any]:
    """The YAML front matter of a model card, or {} if it has none or it does not parse."""
    match = _FRONT.match(card_text)
    if not match:
        return {}
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _declared(text: str) -> tuple[str, dict[str, str]] | str:
    """A card's license: the key that compares it (case aside; `other` with its name) and the metadata that
    states it, or why there is none to take."""
    match = _FRONT.match(text)
    meta = card_metadata(text)
    if match and not meta:
        return "its card's metadata does not parse"
    license_ = meta.get("license")
    if isinstance(license_, list):
        return f"its card lists {len(license_)} licenses"
    if not isinstance(license_, str) or not license_.strip():
        return "none"
    key = license_.strip().lower()  # the Hub's license ids are lower case
    entries = {"license": key}
    if key == "other":  # a license of its own: its name says which
        entries |= {k: str(meta[k]) for k in ("license_name", "license_link") if meta.get(k)}
        key += f" ({entries.get('license_name', 'no license_name').lower()})"
    return key, entries


def common_license(plan: MergePlan, sources: list[TensorSource]) -> dict[str, str] | None:
    """The license every source's card declares, as card metadata (``license``, and for ``other`` its
    ``license_name`` and ``license_link``); None if a source declares none (with a warning).

    Raises:
        RecipeError: the sources declare different licenses and the recipe does not set ``card.license``.
    """
    if plan.recipe.card.license:
        return {"license": plan.recipe.card.license}
    found: dict[str, tuple[str, dict[str, str]]] = {}
    unknown: list[str] = []
    with ThreadPoolExecutor(min(8, len(sources) or 1), thread_name_prefix="hubmerge-cards") as pool:
        cards = list(pool.map(lambda src: src.fetch("README.md"), sources))  # from the Hub: a request each
    for src, path in zip(sources, cards, strict=True):
        text = path.read_text(encoding="utf-8", errors="replace") if path is not None else ""
        declared = _declared(text)
        if isinstance(declared, tuple):
            found[src.label] = declared
        else:
            unknown.append(f"{src.label} ({src.ref})" + ("" if declared == "none" else f": {declared}"))
    keys = {key for key, _ in found.values()}
    if len(keys) > 1:
        listed = ", ".join(f"{label}: {key}" for label, (key, _) in found.items())
        raise RecipeError(
            f"the sources have different licenses ({listed})",
            path="card.license",
            hint="check that the licenses allow merging, then set `card: {license: ...}` in the recipe",
        )
    if found and unknown:
        # The merge holds weights of every source: one license cannot be claimed for all of them.
        log.warning(
            "the card's license is left `unknown`: %s declare%s %s, but %s declare%s none; "
            "set `card: {license: ...}` in the recipe once you know the merge's license",
            ", ".join(found),
            "s" if len(found) == 1 else "",
            next(iter(keys)),
            ", ".join(unknown),
            "s" if len(unknown) == 1 else "",
        )
        return None
    if not found:
        return None
    entries = {k: v for k, v in next(iter(found.values()))[1].items() if k != "license_link"}
    # The link, wherever a source gives one: as written if absolute; relative (LICENSE, in the source's
    # repository, which the merge does not copy) made absolute on a Hub source, dropped on a local one.
    by_label = {s.label: s for s in sources}
    links = [(by_label[label], e["license_link"]) for label, (_, e) in found.items() if e.get("license_link")]
    for _, link in links:
        if "://" in link or link.startswith("www."):
            entries["license_link"] = link if "://" in link else f"https://{link}"
            return entries
    for source, link in links:
        if source.ref.repo_id and source.commit:
            entries["license_link"] = (
                f"{_hub_url()}/{source.ref.repo_id}/blob/{source.commit}/{link.removeprefix('./')}"
            )
            break
    return entries


def pipeline_tag(config: dict[str, Any] | None) -> str | None:
    """The Hub pipeline tag that matches the config's first architecture."""
    for arch in (config or {}).get("architectures") or []:
        for suffix, tag in PIPELINES:
            if str(arch).endswith(suffix):
                return tag
    return None


def front_matter(
    plan: MergePlan,
    *,
    license_: dict[str, str] | None,
    config: dict[str, Any] | None,
    sentence_transformers: bool,
    repo_id: str | None = None,
) -> dict[str, Any]:
    """The card's metadata: base_model (Hub ids of the sources), relation, tags, library, license.

    ``repo_id``, where the merge is pushed, is no base model of itself (a merge pushed over one of its
    sources: the card's sources table still names it, at its commit).
    """
    merged = get_method(plan.method).needs_base  # a base the method does not merge is no base_model
    hub_ids = list(
        dict.fromkeys(
            s.ref.repo_id
            for s in plan.sources
            if s.ref.repo_id and s.ref.repo_id != repo_id and (merged or s.label != "base")
        )
    )
    tags = ["merge", "hubmerge", plan.method, *(["sentence-transformers"] if sentence_transformers else [])]
    meta: dict[str, Any] = {}
    if hub_ids:
        meta["base_model"] = hub_ids
        meta["base_model_relation"] = "merge"
    meta["tags"] = list(dict.fromkeys([*tags, *plan.recipe.card.tags]))
    meta["library_name"] = "transformers" if config is not None else None
    tag = pipeline_tag(config)
    if sentence_transformers:  # loads with SentenceTransformer (its modules.json came along): an embedder
        meta["library_name"], tag = "sentence-transformers", "sentence-similarity"
    if tag:
        meta["pipeline_tag"] = tag
    meta |= license_ or {"license": "unknown"}
    if plan.recipe.card.language:
        meta["language"] = plan.recipe.card.language
    return {k: v for k, v in meta.items() if v is not None}


def _card_yaml(meta: dict[str, Any]) -> str:
    """Front matter through huggingface_hub's ModelCardData, the structure the Hub itself validates."""
    from huggingface_hub import ModelCardData

    return ModelCardData(**meta).to_yaml() + "\n"


def _hub_url() -> str:
    """Where the sources' pages are: the Hub huggingface_hub talks to (``HF_ENDPOINT``, which a push goes to
    as well), without any credentials in the URL."""
    from urllib.parse import urlsplit, urlunsplit

    from huggingface_hub import constants

    parts = urlsplit(str(constants.ENDPOINT).rstrip("/"))
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=host))


def render_card(
    plan: MergePlan,
    meta: dict[str, Any],
    *,
    out_name: str,
    repo_id: str | None = None,
    revision: str | None = None,
    tokenizer: bool = True,
) -> str:
    """The whole README.md of the merge; ``revision``: the branch it is pushed to (the snippet loads it);
    ``tokenizer``: whether the output has a tokenizer (the snippet loads it too)."""
    recipe = plan.recipe
    spec = get_method(plan.method)
    params = resolve_params(recipe, spec, {})
    per_model = [p for p in spec.params if p.per_model]
    header = "| # | source | revision | " + "".join(f"{p.name} | " for p in per_model)
    rows = [header.rstrip(), "|" + " --- |" * (3 + len(per_model))]
    for i, src in enumerate(plan.sources):
        ref = (
            f"[{src.ref.repo_id}]({_hub_url()}/{src.ref.repo_id})"
            if src.ref.repo_id
            else f"`{Path(str(src.ref)).name}` (local)"
        )
        commit = f"`{src.commit}`" if src.commit else "local files"
        values = "".join(
            f" {params[p.kwarg][i]:g} |" if i < len(recipe.models) else " |"  # type: ignore[index]
            for p in per_model
        )
        label = src.label if spec.needs_base or src.label != "base" else "base (config and tokenizer only)"
        rows.append(f"| {label} | {ref} | {commit} |{values}")
    global_params = {p.name: params[p.kwarg] for p in spec.params if not p.per_model}
    if spec.random:  # the masks' seed: the same seed, the same bytes
        global_params["seed"] = seed_of(recipe)
    parameters_section = ""
    if global_params or recipe.rules:
        lines = ["## Parameters", ""]
        lines += [f"- `{k}` = {v}" for k, v in global_params.items()]
        lines += [
            f"- rule: tensors `{r.globs}` -> "
            + (
                "skipped"
                if r.skip
                else f"taken from {r.take}"
                if r.take is not None
                else f"parameters {r.parameters}"
            )
            for r in recipe.rules
        ]
        if plan.skipped:
            lines.append(f"- {len(plan.skipped)} tensors left out by rules")
        parameters_section = "\n".join(lines) + "\n"
    target = repo_id or f"./{out_name}"
    auto = "AutoModelForCausalLM" if meta.get("pipeline_tag") == "text-generation" else "AutoModel"
    if meta.get("pipeline_tag") == "text-classification":
        auto = "AutoModelForSequenceClassification"
    where = f'"{target}"' + (f', revision="{revision}"' if repo_id and revision else "")
    usage = (
        f"from transformers import AutoTokenizer, {auto}\n\n"
        f"tokenizer = AutoTokenizer.from_pretrained({where})\n"
        f"model = {auto}.from_pretrained({where})"
        if tokenizer  # no tokenizer came with the sources: loading one would fail, or find a stale one
        else f"from transformers import {auto}\n\nmodel = {auto}.from_pretrained({where})"
    )
    if meta.get("library_name") == "sentence-transformers":
        usage = (
            "from sentence_transformers import SentenceTransformer\n\n"
            f"model = SentenceTransformer({where})\n"
            'embeddings = model.encode(["A first sentence.", "Another one."])'
        )
    template = Template(resources.files("hubmerge").joinpath("templates/card.md").read_text(encoding="utf-8"))
    return template.substitute(
        front_matter=_card_yaml(meta),
        title=repo_id.split("/")[-1] if repo_id else out_name,
        description=recipe.card.description
        or f"A {plan.method} merge of {len(recipe.models)} fine-tuned models.",
        n_models=len(recipe.models),
        version=__version__,
        method=plan.method,
        method_summary=spec.summary.rstrip("."),
        paper=spec.paper,
        sources_table="\n".join(rows),
        parameters_section=parameters_section,
        recipe_yaml=recipe.to_yaml(),
        out_name=out_name,
        fetch=(
            f"hf download {repo_id} recipe.yaml --local-dir ."
            + (f" --revision {revision}" if revision else "")
            + "\n"
            if repo_id
            else ""
        ),
        recipe_sha256=plan.recipe_sha256,
        usage=usage,
    )
