"""Moved: the headless runner's stand-ins for ComfyUI core nodes now live in
``xmgie.runner.core_nodes``. This module keeps the old import path working for one
release (0.2), with a DeprecationWarning. (The old ``xmgie.mgie_core.workflow`` has no
such shim: the library must not import the graph engine; use ``xmgie.runner.engine``.)"""

import warnings

from ..runner.core_nodes import *  # noqa: F401,F403
from ..runner.core_nodes import RunContext, context, using_context  # noqa: F401

warnings.warn("xmgie.nodes.core_standins moved to xmgie.runner.core_nodes; the old import "
              "path will be removed in 0.3", DeprecationWarning, stacklevel=2)
