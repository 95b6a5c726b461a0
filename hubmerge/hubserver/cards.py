"""Model card metadata: the YAML front matter of ``README.md``, read for ``cardData``, checked as on the Hub.

The checks are the basics the Hub enforces on model cards, each naming the field and what it must be: a
card the Hub would refuse is refused here too, so a publish that passes here does not fail there for them.
"""

from __future__ import annotations

import re

import yaml

_FRONT_MATTER_RE = re.compile(r"^\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", re.DOTALL)
_EMPTY_FRONT_MATTER_RE = re.compile(r"^\s*---[ \t]*\r?\n---[ \t]*(?:\r?\n|$)")

_STRING_FIELDS = ("license", "license_name", "license_link", "library_name", "pipeline_tag", "model_name")
_STRING_OR_LIST_FIELDS = ("base_model", "language", "datasets", "metrics")
_LIST_FIELDS = ("tags",)
_BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


class CardError(ValueError):
    """The front matter is not valid YAML or not a mapping."""


def front_matter(text: str) -> dict[str, object] | None:
    """Parse the YAML front matter of a card.

    Args:
        text: The whole ``README.md``.

    Returns:
        The metadata mapping, or ``None`` when the card has no front matter.

    Raises:
        CardError: When the front matter is not valid YAML or not a mapping.
    """
    if _EMPTY_FRONT_MATTER_RE.match(text):
        return {}
    match = _FRONT_MATTER_RE.match(text)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise CardError(f"the YAML front matter cannot be parsed: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CardError(f"the YAML front matter must be a mapping, found {type(data).__name__}")
    return {str(key): value for key, value in data.items()}


def card_data(text: str) -> dict[str, object] | None:
    """The ``cardData`` the Hub reports for a card, or ``None`` when it has none or it is invalid.

    Args:
        text: The whole ``README.md``.

    Returns:
        The metadata mapping, or ``None``.
    """
    try:
        return front_matter(text)
    except CardError:
        return None


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def validate_card(text: str) -> list[str]:
    """Check a card's metadata against the rules the Hub applies to model cards.

    Args:
        text: The whole ``README.md``.

    Returns:
        One message per problem; empty when the card is valid (a card without front matter is valid).
    """
    try:
        data = front_matter(text)
    except CardError as exc:
        return [str(exc)]
    if not data:
        return []
    errors = [
        f'"{name}" must be a string' for name in _STRING_FIELDS if name in data and not _is_str(data[name])
    ]
    for name in _STRING_OR_LIST_FIELDS:
        if name in data and not (_is_str(data[name]) or _is_str_list(data[name])):
            errors.append(f'"{name}" must be a string or a list of strings')
    for name in _LIST_FIELDS:
        if name in data and not _is_str_list(data[name]):
            errors.append(f'"{name}" must be a list of strings')
    relation = data.get("base_model_relation")
    if relation is not None and relation not in _BASE_MODEL_RELATIONS:
        errors.append(f'"base_model_relation" must be one of {", ".join(_BASE_MODEL_RELATIONS)}')
    if relation is not None and "base_model" not in data:
        errors.append('"base_model_relation" requires "base_model"')
    model_index = data.get("model-index")
    if model_index is not None and not (
        isinstance(model_index, list)
        and all(isinstance(item, dict) and "name" in item for item in model_index)
    ):
        errors.append('"model-index" must be a list of objects, each with a "name"')
    return errors


def _is_str(value: object) -> bool:
    return isinstance(value, str)
