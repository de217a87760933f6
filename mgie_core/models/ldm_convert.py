"""Diffusers -> original (LDM) key layout, for writing single-file checkpoints of SD 1.x,
SD 2.x and SDXL.

Loading goes the other way through diffusers' own single-file code; this module writes
files in the layout ComfyUI's models/checkpoints holds, which is how the tests make a real
single-file checkpoint from a tiny model, and how the loaders list the names and shapes a
file must have. The key correspondence follows the published structure of the LDM UNet
(input_blocks / middle_block / output_blocks; SDXL's added-conditioning MLP is
``label_emb.0``) and VAE (encoder.down / decoder.up, reversed). The text encoders:

* SD 1.x CLIP-L: transformers' own names under ``cond_stage_model.transformer.``;
* SDXL: CLIP-L the same way under ``conditioner.embedders.0.transformer.``, and
  OpenCLIP-bigG under ``conditioner.embedders.1.model.`` in OpenCLIP's layout;
* SD 2.x: OpenCLIP-H under ``cond_stage_model.model.`` in OpenCLIP's layout.

OpenCLIP's layout (:func:`open_clip_to_ldm`): ``transformer.resblocks.N`` with the query,
key and value projections fused into one ``attn.in_proj_weight`` / ``in_proj_bias``
(rows q, k, v), ``positional_embedding`` a bare tensor, ``ln_final``, and
``text_projection`` applied as ``x @ text_projection`` (the transpose of transformers'
``text_projection.weight``)."""

from __future__ import annotations

import torch

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"),
           ("time_emb_proj", "emb_layers.1"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def _unet_prefix_map(config) -> list[tuple[str, str]]:
    """(diffusers prefix, ldm prefix) pairs for every block of the UNet."""
    L = config["layers_per_block"]
    down, up = config["down_block_types"], config["up_block_types"]
    m: list[tuple[str, str]] = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
        # SDXL: the MLP of the pooled text embedding and the time ids
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
    ]
    for i, kind in enumerate(down):
        for j in range(L):
            idx = i * (L + 1) + j + 1
            m.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0."))
            if "CrossAttn" in kind:
                m.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1."))
        if i < len(down) - 1:
            m.append((f"down_blocks.{i}.downsamplers.0.conv.",
                      f"input_blocks.{(i + 1) * (L + 1)}.0.op."))
    m.append(("mid_block.attentions.0.", "middle_block.1."))
    for j in range(2):
        m.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}."))
    for i, kind in enumerate(up):
        for j in range(L + 1):
            idx = i * (L + 1) + j
            m.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0."))
            if "CrossAttn" in kind:
                m.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1."))
        if i < len(up) - 1:
            slot = 2 if "CrossAttn" in kind else 1
            m.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (L + 1) + L}.{slot}."))
    return m


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    prefixes = sorted(_unet_prefix_map(config), key=lambda p: -len(p[0]))
    out = {}
    for key, value in state.items():
        for dp, lp in prefixes:
            if key.startswith(dp):
                rest = key[len(dp):]
                if ".resnets." in dp or dp.startswith("mid_block.resnets"):
                    for a, b in _RESNET:
                        if rest.startswith(a + "."):
                            rest = b + rest[len(a):]
                            break
                out["model.diffusion_model." + lp + rest] = value
                break
        else:
            raise KeyError(f"no LDM name for UNet weight {key}")
    return out


_VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
             ("to_out.0", "proj_out")]


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    n = len(config["block_out_channels"])
    m: list[tuple[str, str]] = [("encoder.conv_norm_out.", "encoder.norm_out."),
                                ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for i in range(n):
        m.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."))
        m.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        m.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."))
        m.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    for part in ("encoder", "decoder"):
        m.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
        for j in range(2):
            m.append((f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}."))
    m.sort(key=lambda p: -len(p[0]))
    out = {}
    for key, value in state.items():
        new = key
        for dp, lp in m:
            if key.startswith(dp):
                new = lp + key[len(dp):]
                break
        if ".attn_1." in new:
            for a, b in _VAE_ATTN:
                new = new.replace(f".attn_1.{a}.", f".attn_1.{b}.")
            if new.endswith("weight") and value.ndim == 2:  # linear -> 1x1 conv
                value = value[:, :, None, None]
        else:
            for a, b in _VAE_RESNET:
                new = new.replace(f".{a}.", f".{b}.")
        out["first_stage_model." + new] = value
    return out


SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."


def text_encoder_to_ldm(state: dict[str, torch.Tensor],
                        prefix: str = SD1_TEXT_PREFIX) -> dict[str, torch.Tensor]:
    # Real checkpoints name CLIP weights "...transformer.text_model.*"; transformers >= 5.6
    # flattened CLIPTextModel and dropped the "text_model." level, so put it back.
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in state.items()}


_OPEN_CLIP_LAYER = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                    ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder (with or without its projection) in OpenCLIP's
    layout under ``prefix`` (see the module docstring). Buffers transformers computes
    (``position_ids``) are not written; any other weight without an OpenCLIP name is an
    error."""
    s = {k.removeprefix("text_model."): v for k, v in state.items()
         if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(k.split(".")[2]) for k in s if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [s.pop(f"{src}self_attn.{x}_proj.{kind}") for x in "qkv"])
            for a, b in _OPEN_CLIP_LAYER:
                out[f"{dst}{b}.{kind}"] = s.pop(f"{src}{a}.{kind}")
    out[prefix + "token_embedding.weight"] = s.pop("embeddings.token_embedding.weight")
    out[prefix + "positional_embedding"] = s.pop("embeddings.position_embedding.weight")
    for kind in ("weight", "bias"):
        out[f"{prefix}ln_final.{kind}"] = s.pop(f"final_layer_norm.{kind}")
    if "text_projection.weight" in s:
        out[prefix + "text_projection"] = s.pop("text_projection.weight").T
    if s:
        raise KeyError(f"no OpenCLIP name for text encoder weight(s) {sorted(s)[:4]}")
    return out


def pipeline_to_ldm(unet, vae, text_encoder, text_encoder_2=None, *,
                    family: str = "sd1") -> dict[str, torch.Tensor]:
    """One single-file state dict (ComfyUI's layout) from diffusers/transformers modules:
    ``family`` "sd1" (CLIP-L), "sd2" (OpenCLIP-H as ``text_encoder``) or "sdxl" (CLIP-L
    and OpenCLIP-bigG with its projection as ``text_encoder_2``)."""
    sd = {}
    sd.update(unet_to_ldm(unet.state_dict(), unet.config))
    sd.update(vae_to_ldm(vae.state_dict(), vae.config))
    sd.update(text_encoders_to_ldm(family, text_encoder.state_dict(),
                                   None if text_encoder_2 is None else
                                   text_encoder_2.state_dict()))
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def text_encoders_to_ldm(family: str, state: dict[str, torch.Tensor],
                         state_2: dict[str, torch.Tensor] | None = None
                         ) -> dict[str, torch.Tensor]:
    """The text encoders' part of a single file of ``family`` (see :func:`pipeline_to_ldm`)."""
    if family == "sd1":
        return text_encoder_to_ldm(state)
    if family == "sd2":
        return open_clip_to_ldm(state, SD2_TEXT_PREFIX)
    if family == "sdxl":
        if state_2 is None:
            raise ValueError("an SDXL checkpoint needs both text encoders")
        return {**text_encoder_to_ldm(state, SDXL_TEXT_PREFIX),
                **open_clip_to_ldm(state_2, SDXL_TEXT_2_PREFIX)}
    raise ValueError(f"family must be sd1, sd2 or sdxl, not {family!r}")
