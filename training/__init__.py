"""Training: the papers' trainable parts (xMGIE's PFB weights, identity embeddings and
discriminator; MGIE's embeddings, LM head, edit head and UNet) fitted on paired edits
with Hugging Face accelerate, from one CPU process to many GPUs.

The trainable modules and the losses live in the library (``mgie_core.trainable``,
``mgie_core.losses``); this package holds the loop and what feeds it:

* :mod:`.task` -- what the engine trains (the :class:`~.task.TrainTask` protocol) and the
  batch it is given;
* :mod:`.data` -- paired datasets (batch manifests with a ``target``, InstructPix2Pix and
  MagicBrush folders, local Hugging Face datasets) and the synthetic generator;
* :mod:`.config` -- the YAML configs (``configs/train/``);
* :mod:`.engine` -- the accelerate loop: accumulation, mixed precision, checkpoints,
  exact resume, validation and early stopping;
* :mod:`.xmgie_task`, :mod:`.mgie_task`, :mod:`.mmig_task` -- the tasks (MMIG's five
  stages are configs of one task).

Layering: this package may import ``mgie_core``, ``runner`` (the dataset reader) and
``evaluation`` (validation metrics); only ``cli`` and ``nodes`` import it.
"""
