"""The headless graph engine behind ``xmgie run``/``check``/``batch``: a host for ComfyUI
workflows outside ComfyUI. It sits beside the node pack, above the ``mgie_core`` library,
which never imports it; it imports neither the pack's nodes nor the command line (the
host hands it a node registry).

* :mod:`.engine` loads, validates and executes a workflow graph in the API form; it
  knows nothing about the pack's nodes.
* :mod:`.workflow_ui` converts between ComfyUI's UI format and the API form (one seed
  rule for both directions) and lays out the shipped UI workflows.
* :mod:`.core_nodes` holds standalone versions of the ComfyUI core nodes that workflows
  use (LoadImage, LoadImageMask, SaveImage, PreviewImage, ...) and the run context
  (input and output folders) they read.
* :mod:`.batch` (``xmgie batch``) maps a workflow over a dataset (:mod:`.dataset`) by the
  rule of :mod:`.mapping`, keeping models loaded per process (:mod:`.model_cache`), with
  named variants (:mod:`.variants`), optionally on Ray workers (:mod:`.scale`).
"""
