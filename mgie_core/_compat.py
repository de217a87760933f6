"""Old import paths of names that moved between modules, kept for one release.

A module that lost names defines ``__getattr__ = moved(__name__, {"old_name": "new.module"})``:
importing the name from the old module still works and warns once per call site with a
``DeprecationWarning`` that says where it lives now."""

from __future__ import annotations

import importlib
import warnings
from typing import Callable


def moved(module: str, names: dict[str, str], *, until: str = "0.3") -> Callable[[str], object]:
    """A module-level ``__getattr__`` for names that now live in another module.

    ``names`` maps the old name to ``"package.module"`` or ``"package.module:new_name"``
    (relative to ``xmgie.mgie_core`` when it starts with a dot)."""
    package = module.rsplit(".mgie_core", 1)[0] + ".mgie_core" if ".mgie_core" in module \
        else module

    def __getattr__(name: str):
        target = names.get(name)
        if target is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, _, new_name = target.partition(":")
        new_name = new_name or name
        mod = importlib.import_module(where if not where.startswith(".") else package + where)
        shown = mod.__name__.split(".", 1)[-1] if mod.__name__.startswith("xmgie.") \
            else mod.__name__
        warnings.warn(f"{module.split('.', 1)[-1]}.{name} moved to {shown}.{new_name}; the old "
                      f"import path will be removed in {until}", DeprecationWarning,
                      stacklevel=2)
        return getattr(mod, new_name)

    return __getattr__
