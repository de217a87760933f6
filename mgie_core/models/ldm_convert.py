"""Diffusers -> original (LDM) key layout for SD 1.x, for writing single-file checkpoints.

Loading goes the other way through diffusers' own single-file code; this module writes
files in the layout ComfyUI's models/checkpoints holds (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``), which is how the tests make
a real single-file checkpoint from a tiny model. The key correspondence follows the
published structure of the LDM UNet (input_blocks / middle_block / output_blocks) and VAE
(encoder.down / decoder.up, reversed)."""

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


def text_encoder_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Real checkpoints name CLIP weights "...transformer.text_model.*"; transformers >= 5.6
    # flattened CLIPTextModel and dropped the "text_model." level, so put it back.
    return {"cond_stage_model.transformer." + (k if k.startswith("text_model.") else
                                               "text_model." + k): v
            for k, v in state.items()}


def pipeline_to_ldm(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One SD 1.x single-file state dict from diffusers/transformers modules."""
    sd = {}
    sd.update(unet_to_ldm(unet.state_dict(), unet.config))
    sd.update(vae_to_ldm(vae.state_dict(), vae.config))
    sd.update(text_encoder_to_ldm(text_encoder.state_dict()))
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}
