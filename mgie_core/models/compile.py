"""Opt-in compiled UNet forward: ``torch.compile`` of the UNet's hook-free
compute, in place, for fixed shapes.

What is compiled. Not the whole UNet: its attention layers run the pack's controlled
processors (``attention.ControlledAttnProcessor``), whose Python hooks (injection, CAM,
capture, truncation) change from step to step, and the pack patches other modules'
forwards (PFB's blend sites). Compiling across those would specialise on each step's
hook state and recompile every step. Instead the ``forward`` of every leaf compute
module that carries no pack logic is compiled on its own: the resnet blocks, the down-
and upsamplers, the transformer blocks' feed-forward layers and the time embedding --
the convolutions, group norms, activations and MLPs, most of a UNet pass's kernels.
Hooks registered on those modules keep working: ``nn.Module`` runs them around
``forward``, outside the compiled code. The attention processors stay eager.

Modes: "default" (inductor, fused kernels), "reduce-overhead" (inductor with CUDA
graphs) and "graphs" (below); "max-autotune" is refused (its autotuning takes many
minutes per shape and the gain on launch-bound passes is small). ``dynamic=False``: each
shape (batch 1, 2, 4, with and without gradients) compiles once and runs specialised
code after. Dynamo keeps
one cache per code object, and every instance of a class shares its ``forward``'s code:
SD 1.5's 22 resnet blocks, each in several shapes, share one cache. Its size is set from
the number of compiled instances (``VARIANTS_PER_MODULE`` entries each); a fixed limit of
64 was hit on the H200 (dynamo then runs the rest eagerly, checking 64 guards first: the
compiled edit was slower than the eager one, bench/RESULTS.md). The first edit after
compiling is slow (every shape compiles; minutes on a GPU for SD 1.5); later ones reuse
the code.

"graphs" compiles nothing: it leaves every module eager and asks the samplers and the
inversion to capture whole UNet calls as CUDA graphs and replay them (mgie_core/
graphs.py says why whole calls, with the attention hooks inside, rather than
"reduce-overhead"); on a device without CUDA graphs they run eagerly, with the reason
logged.

"reduce-overhead" on the CPU is "default" (CUDA graphs need a GPU); on a GPU it has not
been measured yet: the GPU run of ``bench/edit_bench.py --compile reduce-overhead``
checks that its edit equals the eager one (bench/RESULTS.md).
"""

from __future__ import annotations

import torch

from ..errors import InputError

COMPILE_MODES = ("off", "default", "reduce-overhead", "graphs")
# compiled variants per module instance: batch 1, 2 and 4 (MAG's truncated forward, the
# unbatched and batched guidance), each with and without gradients, and some spare
VARIANTS_PER_MODULE = 8


def _compiled_types() -> tuple[type, ...]:
    from diffusers.models.attention import FeedForward
    from diffusers.models.embeddings import TimestepEmbedding
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    return (ResnetBlock2D, Downsample2D, Upsample2D, FeedForward, TimestepEmbedding)


def check_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise InputError("compile", f"is {mode!r}", " or ".join(COMPILE_MODES),
                         "max-autotune is not offered: it tunes for many minutes per shape.")
    return mode


def compile_unet(unet: torch.nn.Module, mode: str = "default",
                 backend: str | None = None) -> int:
    """Compile the UNet's hook-free compute modules in place (see the module docstring);
    returns how many modules run compiled. ``mode="off"`` restores the eager forwards;
    ``mode="graphs"`` restores them too and marks the UNet for captured calls.
    Calling it again with the same mode does nothing (the compiled code is kept);
    ``backend`` (tests: "aot_eager") overrides inductor, without a mode."""
    check_mode(mode)
    state = unet.__dict__.get("_xmgie_compile")
    key = (mode, backend)
    if state is not None and state == key:
        return sum(1 for m in unet.modules() if "forward" in m.__dict__)
    for m in unet.modules():                        # back to eager first
        if "forward" in m.__dict__ and getattr(m, "_xmgie_compiled", False):
            del m.forward
            m._xmgie_compiled = False
    unet.__dict__["_xmgie_compile"] = None
    if mode == "off":
        return 0
    if mode == "graphs":           # nothing compiled: the call sites capture whole calls
        unet.__dict__["_xmgie_compile"] = key
        return 0
    targets = [m for m in unet.modules()
               if isinstance(m, _compiled_types()) and "forward" not in m.__dict__]
    _size_compile_cache(targets)
    options = dict(dynamic=False)
    if backend is not None and backend != "inductor":
        options["backend"] = backend
    else:
        options["mode"] = mode
    for m in targets:
        m.forward = torch.compile(m.forward, **options)
        m._xmgie_compiled = True
    unet.__dict__["_xmgie_compile"] = key
    return len(targets)


def _size_compile_cache(modules) -> int:
    """Let dynamo's per-code-object cache hold every shape of every instance of the most
    numerous compiled class (never lowering a larger setting); returns the size set."""
    import collections

    import torch._dynamo.config as dynamo_config

    per_class = collections.Counter(type(m).forward for m in modules)
    want = VARIANTS_PER_MODULE * max(per_class.values(), default=1)
    # "recompile_limit" was "cache_size_limit" before torch 2.7
    for names in (("recompile_limit", "cache_size_limit"),
                  ("accumulated_recompile_limit", "accumulated_cache_size_limit")):
        name = next((n for n in names if hasattr(dynamo_config, n)), None)
        if name is not None:
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), want))
    return want


def compiled_mode(unet: torch.nn.Module) -> str:
    """The mode the UNet was compiled with ("off" when it runs eager)."""
    state = unet.__dict__.get("_xmgie_compile")
    return state[0] if state else "off"
