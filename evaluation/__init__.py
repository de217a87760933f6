"""Evaluation of batch runs (``xmgie eval``, ``xmgie table1`` / ``table2``): metrics,
ablation tables and pictures.

Pack level, beside ``runner/``: ``mgie_core`` never imports it. Needs the ``eval`` extra
(``pip install "xmgie[eval]"``: torchmetrics, torch-fidelity, lpips, matplotlib).

* :mod:`.networks` finds and loads the metric networks (Inception, LPIPS backbones, CLIP)
  from the model folders or the local torch/Hugging Face caches, never downloading;
* :mod:`.metrics` computes the metrics on image tensors;
* :mod:`.evaluate` evaluates run folders and their variants into one table;
* :mod:`.attributes` computes attribute accuracy (a classifier reading the instructed
  attribute on each result, against its own accuracy on the unedited photos);
* :mod:`.report` writes the table (CSV, JSON, Markdown) and the pictures;
* :mod:`.tables` writes the paper's Table 1 and Table 2 from evaluations (CSV, Markdown,
  LaTeX);
* :mod:`.tiny` writes random-weight metric networks in their real layouts (tests, --tiny).
"""
