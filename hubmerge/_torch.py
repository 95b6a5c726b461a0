"""``torch``, imported on first use.

The method table (``hubmerge.methods``) is needed to check a recipe and to plan, which read no tensor; the
methods themselves need torch, whose import takes 1-2 s. Modules on that path take ``torch`` from here: the
name stands for the real module, which is imported the first time one of its attributes is looked up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch as torch
else:

    class _Torch:
        def __getattr__(self, name: str) -> Any:
            return getattr(importlib.import_module("torch"), name)

        def __repr__(self) -> str:
            return "<torch, imported on first use>"

    torch = _Torch()

__all__ = ["torch"]
