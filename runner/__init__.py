"""The headless graph engine behind ``xmgie run``/``check``: a host for ComfyUI workflows
outside ComfyUI. It sits beside the node pack, above the ``mgie_core`` library, which
never imports it.

* :mod:`.engine` loads, converts (UI to API), validates and executes a workflow graph;
  it knows nothing about the pack's nodes.
* :mod:`.core_nodes` holds standalone versions of the ComfyUI core nodes that workflows
  use (LoadImage, LoadImageMask, SaveImage, PreviewImage) and the run context (input and
  output folders) they read.
* :mod:`.batch` (``xmgie batch``) maps a workflow over a dataset (:mod:`.dataset`) by the
  rule of :mod:`.mapping`, keeping models loaded per process (:mod:`.model_cache`), with
  named variants (:mod:`.variants`), optionally on Ray workers (:mod:`.scale`);
  :mod:`.batch_cli` holds the ``batch`` and ``eval`` commands (evaluation itself is the
  pack-level ``evaluation`` package).
"""
