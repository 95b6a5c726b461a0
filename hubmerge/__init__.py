"""hubmerge: merge fine-tuned models tensor by tensor, from local disk or the Hugging Face Hub.

>>> import hubmerge
>>> result = hubmerge.merge("recipe.yaml", out="merged")      # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import MergeResult, merge, plan  # noqa: E402
from .errors import (  # noqa: E402
    HubError,
    HubmergeError,
    MergeError,
    OutputError,
    PlanError,
    PublishError,
    RecipeError,
    SourceError,
    stop_signals,
)
from .plan import MergePlan  # noqa: E402  (loaded by .api already: `plan` stays the function)
from .publish import PushTarget  # noqa: E402
from .recipe import Recipe, load_recipe  # noqa: E402

__all__ = [
    "HubError",
    "HubmergeError",
    "MergeError",
    "MergePlan",
    "MergeResult",
    "OutputError",
    "PlanError",
    "PublishError",
    "PushTarget",
    "Recipe",
    "RecipeError",
    "SourceError",
    "__version__",
    "load_recipe",
    "merge",
    "plan",
    "stop_signals",
]
