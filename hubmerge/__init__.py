"""hubmerge: merge fine-tuned models tensor by tensor, from local disk or the Hugging Face Hub.

>>> import hubmerge
>>> result = hubmerge.merge("recipe.yaml", out="merged")      # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import MergeResult, merge, plan  # noqa: E402
from .errors import HubmergeError  # noqa: E402
from .publish import PushTarget  # noqa: E402
from .recipe import Recipe, load_recipe  # noqa: E402

__all__ = [
    "HubmergeError",
    "MergeResult",
    "PushTarget",
    "Recipe",
    "__version__",
    "load_recipe",
    "merge",
    "plan",
]
