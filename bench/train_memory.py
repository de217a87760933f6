"""Memory of xMGIE's adversarial term: a PatchGAN critic on latents against one on decoded
images (docs/algorithms.md §14, the discriminator choice).

    python bench/train_memory.py [--size 512] [--check-size 192] [--json PATH]

What it counts, per training image (batch 1), float32:

* activations saved for the backward pass: every tensor autograd keeps between the
  forward and the backward, counted once per storage with
  ``torch.autograd.graph.saved_tensors_hooks`` (parameters excluded: they are counted as
  weights). This is the memory that grows with the image size, and it does not depend on
  the device: the counts come from the meta device (shapes only, no arithmetic, so the
  full 512 px SD 1.5 VAE decoder costs nothing to "run"); ``--check-size`` first runs
  the same counts with real tensors on the CPU at a small size and requires them to be
  equal to the meta counts (they are the same autograd graph).
* weights: the critic's parameters, their gradients and Adam's two moments (4 x the
  parameter bytes), and the frozen VAE decoder's weights the pixel critic needs on the
  device besides.

Two steps per iteration: the generator's (the critic frozen; the gradient must reach the
predicted clean latent, so the pixel critic's path keeps the decoder's activations) and
the critic's (real and detached fake; the fake is decoded without gradient). Rows:

* latent:  LatentPatchDiscriminator on the 4 x (size/8)^2 latent;
* pixel:   the same PatchGAN on 3 x size^2 images, the latent decoded by SD 1.5's VAE
  decoder (mgie_core/configs/sd15/vae, random weights: memory does not depend on them);
  ``critic own`` is the critic's share of the generator step: what a pixel critic adds
  where the edit is decoded with gradient anyway (xMGIE's pixel L1 and L_id decode the
  low-noise rows);
* pixel+ckpt: the same with the decoder's mid and up blocks checkpointed
  (``identity_guidance.checkpointed_decoder``): what stays saved between forward and
  backward (outside the blocks, plus each block's input), and ``recompute`` the largest
  block's activations, rebuilt one block at a time during the backward.

Attention in the VAE's middle block runs through scaled_dot_product_attention; what it
saves depends on the kernel the device picks: the math kernel (the meta device's, and the
one the CPU check is forced to) keeps the (size/8)^2 x (size/8)^2 attention matrix,
flash and memory-efficient kernels only row statistics, so on a GPU the pixel rows' gen
step is that much smaller (the note under the table says how much one copy is).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from xmgie.mgie_core.identity_guidance import checkpointed_decoder
from xmgie.mgie_core.trainable import LatentPatchDiscriminator, min_latent_size

VAE_CONFIG = Path(__file__).resolve().parents[1] / "mgie_core" / "configs" / "sd15" / "vae"
MIB = 2 ** 20


class SavedBytes:
    """Bytes of the distinct storages autograd saves while the block runs, parameters of
    the ``exclude`` modules not counted; with ``attribute`` ({name: module}), also the
    share saved inside each module. Keep the outputs alive until the block ends (in
    ``keep``): a freed graph's storages could be counted again under a reused address."""

    def __init__(self, exclude=(), attribute: dict | None = None):
        self._params = {id(p) for m in exclude for p in m.parameters()}
        self._seen: set = set()
        self.total = 0
        self.by_module: dict[str, int] = {}
        self.keep: list = []
        self._current: list[str] = []
        self._attribute = attribute or {}
        self._handles = []

    def _pack(self, t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(base) in self._params or id(t) in self._params:
            return t
        # meta storages have no address: the root tensor's identity stands for it
        key = id(base) if t.device.type == "meta" else t.untyped_storage().data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.keep.append(base)
            n = base.untyped_storage().nbytes()
            self.total += n
            if self._current:
                name = self._current[-1]
                self.by_module[name] = self.by_module.get(name, 0) + n
        return t

    def _leave(self, module, args, output) -> None:   # None: the output stays as it is
        self._current.pop()

    def __enter__(self):
        for name, module in self._attribute.items():
            self._handles.append(module.register_forward_pre_hook(
                lambda m, a, name=name: self._current.append(name)))
            self._handles.append(module.register_forward_hook(self._leave))
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self.keep.clear()


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * 4 for p in module.parameters())


def trained_bytes(module: torch.nn.Module) -> int:
    """Parameters + gradients + Adam's two moments, float32."""
    return 4 * weight_bytes(module)


def build_vae_decoder(device: str):
    from diffusers import AutoencoderKL

    config = json.loads((VAE_CONFIG / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device(device):
        vae = AutoencoderKL(**config)
    vae.requires_grad_(False)
    vae.encoder = None            # the decoder is all the critic's path needs
    return vae


def _critic_steps(critic, fake_fn, real: torch.Tensor, exclude=()) -> tuple[int, int]:
    """(generator step's saved bytes, critic step's saved bytes): the generator's step
    with the critic frozen and a gradient to the fake, the critic's on the real and the
    fake made without gradient."""
    critic.requires_grad_(False)
    with SavedBytes(exclude=[critic, *exclude]) as gen:
        gen.keep.append(critic(fake_fn(True)))
    critic.requires_grad_(True)
    with torch.no_grad():
        fake = fake_fn(False)
    with SavedBytes(exclude=[critic, *exclude]) as crit:
        crit.keep += [critic(real), critic(fake)]
    return gen.total, crit.total


def measure(size: int, device: str = "meta") -> list[dict]:
    """The three rows of the table at ``size`` px on ``device`` ("meta" or "cpu")."""
    torch.manual_seed(0)
    lat = size // 8
    rows = []
    z = torch.randn(1, 4, lat, lat, device=device)

    # (a) the critic on latents: the generator's output is the latent itself
    d_lat = LatentPatchDiscriminator(4, 64, 3).to(device)
    gen, crit = _critic_steps(d_lat, lambda g: z.clone().requires_grad_(g), z.clone())
    rows.append({"critic": "latent", "input": f"4x{lat}x{lat}", "gen_saved": gen,
                 "gen_critic_own": gen,
                 "critic_saved": crit, "recompute": 0, "critic_weights": weight_bytes(d_lat),
                 "critic_trained": trained_bytes(d_lat), "frozen_weights": 0})

    # (b) the critic on images decoded by the VAE decoder
    vae = build_vae_decoder(device)
    d_pix = LatentPatchDiscriminator(3, 64, 3).to(device)
    real = torch.rand(1, 3, size, size, device=device)
    blocks = {"mid_block": vae.decoder.mid_block,
              **{f"up_blocks.{i}": b for i, b in enumerate(vae.decoder.up_blocks)}}

    def decode(z):
        return vae.decode(z / vae.config.scaling_factor).sample

    per_block: dict[str, int] = {}
    for ckpt in (False, True):
        inputs: list[int] = []
        handles = [b.register_forward_pre_hook(
            lambda m, a, inputs=inputs: inputs.append(a[0].untyped_storage().nbytes()))
            for b in blocks.values()]
        attribute = {**blocks, "critic": d_pix} if not ckpt else None
        with SavedBytes(exclude=[d_pix, vae], attribute=attribute) as gen, \
                (checkpointed_decoder(vae) if ckpt else contextlib.nullcontext()):
            d_pix.requires_grad_(False)
            gen.keep.append(d_pix(decode(z.clone().requires_grad_(True))))
        for h in handles:
            h.remove()
        if not ckpt:
            per_block = dict(gen.by_module)
            critic_own = per_block.pop("critic", 0)
        # checkpointing keeps each block's input for the recomputation
        resident = gen.total + (sum(inputs) if ckpt else 0)
        _, crit = _critic_steps(d_pix, lambda g: decode(z), real, exclude=[vae])
        rows.append({"critic": "pixel+ckpt" if ckpt else "pixel", "input": f"3x{size}x{size}",
                     "gen_saved": resident, "gen_critic_own": critic_own,
                     "critic_saved": crit,
                     "recompute": max(per_block.values()) if ckpt else 0,
                     "critic_weights": weight_bytes(d_pix),
                     "critic_trained": trained_bytes(d_pix),
                     "frozen_weights": weight_bytes(vae.decoder)
                     + weight_bytes(vae.post_quant_conv)})
    return rows


def sdpa_kernel_note(size: int) -> str:
    n = (size // 8) ** 2
    return (f"attention: the math kernel (the meta device's), whose saved tensors include "
            f"the VAE middle block's {n}x{n} attention matrix, {n * n * 4 / MIB:.0f} MiB per "
            "copy; flash and memory-efficient kernels keep row statistics instead")


def table(rows: list[dict], size: int) -> str:
    head = (f"{'critic':<11} {'input':>11} {'gen step':>10} {'critic own':>10} "
            f"{'recompute':>10} {'critic step':>11} {'critic+Adam':>11} {'frozen VAE':>10}"
            f"   (MiB, batch 1, {size} px, float32)")
    lines = [head]
    for r in rows:
        lines.append(f"{r['critic']:<11} {r['input']:>11} {r['gen_saved'] / MIB:>10.1f} "
                     f"{r['gen_critic_own'] / MIB:>10.1f} "
                     f"{r['recompute'] / MIB:>10.1f} {r['critic_saved'] / MIB:>11.1f} "
                     f"{r['critic_trained'] / MIB:>11.1f} {r['frozen_weights'] / MIB:>10.1f}")
    return "\n".join(lines)


def check(size: int) -> None:
    """Real tensors on the CPU and the meta device count the same bytes at ``size`` px
    (attention forced to the math kernel on the CPU, the one the meta device runs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        real = measure(size, "cpu")
    meta = measure(size, "meta")
    for a, b in zip(real, meta):
        if a != b:
            raise SystemExit(f"meta and CPU counts differ at {size} px: {a} vs {b}")
    print(f"check: CPU tensors and the meta device count the same bytes at {size} px")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    ap.add_argument("--check-size", type=int, default=192,
                    help="side of the CPU-against-meta check (0: skip; default 192)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    least = 8 * min_latent_size(3)
    for name, v in (("--size", args.size), ("--check-size", args.check_size or least)):
        if v % 8 or v < least:
            ap.error(f"{name} must be a multiple of 8 and at least {least} (the latent "
                     "critic's 3 stride-2 layers need a latent of 24)")
    if args.check_size:
        check(args.check_size)
    rows = measure(args.size, "meta")
    print(table(rows, args.size))
    print(sdpa_kernel_note(args.size))
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
