"""The built-in attention hooks: what the controlled attention processor
(:mod:`.attention`) runs for the pack's own stages.

* :class:`CaptureHook` keeps cross-attention probabilities of chosen layers and rows
  (MAG's losses, the attention masks);
* :class:`CAMHook` and :class:`ConditionCAMHook`: cross-attention masking (PFB-Diff's
  CAM), on the logits or on the probabilities;
* :class:`InjectionHook`: prompt-to-prompt injection, with the token mappers
  :func:`replace_mapper` and :func:`token_alignment`;
* :class:`StopAfter` ends the forward after the last layer a loss reads (raising
  :class:`StopForward`), so its backward goes through that prefix only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from . import grad_mode, host
from .architecture import SD1, UNetArchitecture, layer_hw
from .attention import COND, AttnHook, MaskPyramid


class StopForward(Exception):
    """Raised after the last layer a computation needs; ends the UNet forward early."""


class StopAfter(AttnHook):
    """Ends the UNet forward right after the attention layer ``layer_name``."""

    def __init__(self, layer_name: str):
        self.layer_name = layer_name

    def after_layer(self, layer, ctx) -> None:
        if layer.name == self.layer_name:
            raise StopForward


class CaptureHook(AttnHook):
    """Keep cross-attention probabilities of chosen layers and rows for the current call.

    ``maps[layer_name]`` is (len(rows), heads, HW, 77): the keys are the 77 token rows of
    the conditioning in every family (SDXL's pooled row goes to the time embedding, not to
    cross-attention). Gradients flow through when the UNet call is under autograd (MAG
    needs that)."""

    def __init__(self, layers: Sequence[str], rows: Sequence[tuple[str, str]] | None = None,
                 cross: bool = True, steps: Iterable[int] | None = None):
        self.layers = tuple(layers)
        self.rows = tuple(rows) if rows else None
        self.cross = cross
        self.steps = set(steps) if steps is not None else None
        self.maps: dict[str, torch.Tensor] = {}

    def _applies(self, layer, ctx) -> bool:
        return (layer.is_cross == self.cross and layer.in_set(self.layers)
                and (self.steps is None or ctx.step in self.steps))

    def needs_probs(self, layer, ctx):
        return self._applies(layer, ctx)

    def observe(self, layer, ctx, probs):
        if not self._applies(layer, ctx):
            return
        if self.rows is None:
            self.maps[layer.name] = probs
        else:
            idx = [i for i in (ctx.layout.index(*r) for r in self.rows) if i is not None]
            self.maps[layer.name] = _rows_of(probs, idx)


def _rows_of(x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """x[rows] for a list of batch rows, by slicing (indexing with a Python list makes a
    host index tensor, copied to the device in every call)."""
    rows = list(rows)
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return x[rows[0]:rows[0] + len(rows)]
    return torch.cat([x[r:r + 1] for r in rows]) if rows else x[:0]


def _token_index(tokens, device) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        return host.place(tokens, device, torch.long)
    return torch.tensor(list(tokens), dtype=torch.long, device=device)


def cam_logit_bias(mask_hw: torch.Tensor, in_tokens, out_tokens, n_key: int,
                   dtype) -> torch.Tensor:
    """(B_mask, 1, HW, n_key) additive bias: IN tokens only inside the mask, OUT tokens
    only outside (PFB-Diff's CAM on the logits). Token positions: lists, or index
    tensors already on the mask's device (then no host data is used)."""
    m = mask_hw.flatten(1)[:, None, :, None]              # (B,1,HW,1)
    neg = torch.finfo(dtype).min
    bias = torch.zeros(m.shape[0], 1, m.shape[2], n_key, dtype=dtype, device=m.device)
    for tokens, inside, outside in ((in_tokens, 0.0, neg), (out_tokens, neg, 0.0)):
        if len(tokens):
            idx = _token_index(tokens, m.device)
            col = torch.where(m > 0.5, inside, outside).to(dtype)
            bias.index_copy_(-1, idx, col.expand(-1, -1, -1, idx.shape[0]))
    return bias


class CAMHook(AttnHook):
    """Cross-attention masking (docs/algorithms.md section 4) on the conditional rows.

    ``mode="logits"`` (PFB-Diff's code): the IN/OUT tokens' logits are pushed to -inf
    before the softmax, so each row renormalises over the tokens left. ``mode="probs"``
    (the paper's A * M): the probabilities are multiplied by the mask, not renormalised.

    CAM holds whatever other hooks write into the maps. Where a layer's probabilities are
    explicit (prompt-to-prompt injection, capture), CAM also edits them after every other
    hook (``PROBS_ORDER``): in logits mode the masked entries are zeroed and the row
    renormalised, which is what -inf logits do to a softmax, so a map that injection
    copied from the reconstruction branch is masked too. Without that, injection would
    overwrite the masked maps of any CAM word that also occurs in the source prompt
    during the cross-replace window (an OUT word kept probability 0.019 inside the mask at
    step 0 on the tiny model).

    ``layers`` None (the samplers' default) takes the UNet architecture's CAM layers
    (``LayerChoices.cam_layers``: PFB-Diff's 16x16, 8x8 and two 32x32 layers at 512 px on
    SD 1.x; the same levels on SDXL) when the sampler prepares the hook; until then, and
    for a hook used on its own, SD 1.x's (:attr:`DEFAULT_LAYERS`)."""

    DEFAULT_LAYERS = SD1.layers.cam_layers
    PROBS_ORDER = 100   # after injection and any other rewrite of the maps

    def __init__(self, mask: torch.Tensor, in_tokens: Sequence[int], out_tokens: Sequence[int] = (),
                 layers: Sequence[str] | None = None, mode: str = "logits",
                 branches: Sequence[str] = ("edit",), steps: Iterable[int] | None = None):
        if mode not in ("logits", "probs"):
            raise ValueError(f"CAM mode must be 'logits' or 'probs', not {mode!r}")
        self.pyramid = mask if isinstance(mask, MaskPyramid) else MaskPyramid(mask)
        self.in_tokens, self.out_tokens = list(in_tokens), list(out_tokens)
        self.auto_layers = layers is None
        self.layers = self.DEFAULT_LAYERS if layers is None else tuple(layers)
        self.mode = mode
        self.branches = tuple(branches)
        self.steps = set(steps) if steps is not None else None

    def _rows(self, layer, ctx) -> list[int]:
        if not layer.is_cross or not layer.in_set(self.layers):
            return []
        if self.steps is not None and ctx.step not in self.steps:
            return []
        return [i for i, (b, h) in enumerate(ctx.layout.rows) if h == COND and b in self.branches]

    def prepare(self, device, latent_hw, architecture: UNetArchitecture = SD1):
        if self.auto_layers:
            self.layers = architecture.layers.cam_layers
        self._tokens(device)
        self.pyramid.prepare(architecture.level_sizes(latent_hw), device)

    def _tokens(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = getattr(self, "_idx", None)
        if idx is None or not host.same_device(idx["in"].device, device):
            with grad_mode.normal_tensors():
                self._idx = idx = {"in": _token_index(self.in_tokens, device),
                                   "out": _token_index(self.out_tokens, device)}
        return idx["in"], idx["out"]

    def _cached(self, key, make):
        """One tensor per key for the hook's life, made outside inference mode (MAG's
        and A-STAR's backward passes save it)."""
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            with grad_mode.normal_tensors():
                cache[key] = make()
        return cache[key]

    def logit_bias(self, layer, ctx, n_query, n_key, device, dtype):
        """The bias of this call, made once per (size, layout, dtype) and reused: it
        depends on nothing that changes between steps."""
        rows = self._rows(layer, ctx)
        if self.mode != "logits" or not rows:
            return None
        hw = layer_hw(ctx.latent_hw, n_query)

        def make():
            m = self.pyramid.at(hw, device)
            cam = cam_logit_bias(m, *self._tokens(device), n_key, dtype)
            bias = torch.zeros(len(ctx.layout), 1, n_query, n_key, dtype=dtype, device=device)
            for k, r in enumerate(rows):
                bias[r] = cam[0] if cam.shape[0] == 1 else cam[k]
            return bias

        return self._cached(("bias", hw, n_key, str(dtype), host.device_key(device),
                             tuple(rows), len(ctx.layout)), make)

    def needs_probs(self, layer, ctx):
        return self.mode == "probs" and bool(self._rows(layer, ctx))

    def edit_probs(self, layer, ctx, probs):
        rows = self._rows(layer, ctx)
        if not rows:
            return probs
        hw = layer_hw(ctx.latent_hw, probs.shape[2])
        n_key, dev, dtype = probs.shape[-1], probs.device, probs.dtype

        def make():
            m = self.pyramid.at(hw, dev).flatten(1)[:, None, :, None].to(dtype)  # (B,1,HW,1)
            keep = torch.ones(m.shape[0], 1, m.shape[2], n_key, dtype=dtype, device=dev)
            for idx, col in zip(self._tokens(dev), (m, 1 - m)):
                if idx.numel():
                    keep.index_copy_(-1, idx, col.expand(-1, -1, -1, idx.shape[0]))
            return keep

        keep = self._cached(("keep", hw, n_key, str(dtype), str(dev)), make)
        sub = _rows_of(probs, rows) * keep
        if self.mode == "logits":
            # -inf logits: the row renormalises over the tokens left
            sub = sub / sub.sum(-1, keepdim=True).clamp_min(torch.finfo(sub.dtype).tiny)
        probs = probs.clone()
        for k, r in enumerate(rows):
            probs[r] = sub[k]
        return probs


class ConditionCAMHook(AttnHook):
    """CAM for a condition without word positions (MGIE's visual tokens through its edit
    head): the whole condition may act only inside the mask, the null condition outside.

    The sampler gives the conditional rows the keys [cond; null] (2n tokens) and every
    other row [null; null]. Softmax over a key set written twice is softmax over it once
    (each probability halves, each value counts twice), so the other rows compute exactly
    what they would with [null]. On the conditional rows this hook adds logit biases: in
    the CAM ``layers``, edit-branch pixels inside the mask see only the condition and
    pixels outside only the null condition (CAM's -inf logits, with the condition as the
    IN group and its null copy as the OUT group); everywhere else (other cross-attention
    layers, the reference branch) the null copy is masked out, which leaves the
    attention of the plain condition. Word CAM (:class:`CAMHook`) cannot do this:
    masking every token of a row outside the mask leaves nothing to attend to."""

    def __init__(self, mask: torch.Tensor, n_tokens: int,
                 layers: Sequence[str] | None = None,
                 branches: Sequence[str] = ("edit",)):
        self.pyramid = mask if isinstance(mask, MaskPyramid) else MaskPyramid(mask)
        self.n = int(n_tokens)
        self.auto_layers = layers is None      # the architecture's, as CAMHook's
        self.layers = CAMHook.DEFAULT_LAYERS if layers is None else tuple(layers)
        self.branches = tuple(branches)

    def prepare(self, device, latent_hw, architecture: UNetArchitecture = SD1):
        if self.auto_layers:
            self.layers = architecture.layers.cam_layers
        self.pyramid.prepare(architecture.level_sizes(latent_hw), device)

    def logit_bias(self, layer, ctx, n_query, n_key, device, dtype):
        if not layer.is_cross:
            return None
        rows = ctx.layout.indices(half=COND)
        if not rows:
            return None
        if n_key != 2 * self.n:
            raise ValueError(f"condition CAM expects {2 * self.n} keys ([cond; null]) in "
                             f"{layer.name}, got {n_key}")
        n, neg = self.n, torch.finfo(dtype).min
        bias = torch.zeros(len(ctx.layout), 1, n_query, n_key, dtype=dtype, device=device)
        bias[rows, ..., n:] = neg
        edit = [i for i in rows if ctx.layout.rows[i][0] in self.branches]
        if edit and layer.in_set(self.layers):
            m = self.pyramid.at(layer_hw(ctx.latent_hw, n_query), device)
            cam = cam_logit_bias(m, range(n), range(n, 2 * n), n_key, dtype)
            bias[edit] = cam.expand(len(edit), -1, -1, -1) if cam.shape[0] == 1 else cam
        return bias


def replace_mapper(tokenizer, source_prompt: str, target_prompt: str) -> torch.Tensor:
    """Prompt-to-prompt "replace" for word swaps: an (L, L) matrix M (L = 77) with
    target map k = sum_s M[s, k] * source map s (P2P's ``get_replacement_mapper``).

    The prompts must have the same number of words (split on whitespace). Equal words map
    token for token; a swapped word's tokens map onto the new word's tokens, one to one
    when their token counts are equal, otherwise every source token of the word to every
    target token with weight 1 / (target token count), as P2P does.

    Past the last word (end-of-text and padding) the alignment keeps the offset the swaps
    built up: target position k takes source position k - (length difference), clamped to
    the window. P2P instead maps position k to k after its last swapped word, which, when
    a swap changes the token count, pairs the words after it with shifted source positions
    and can map the source's padding onto target words; we shift deliberately. With equal
    token counts both rules are the same matrix."""
    from .errors import InputError

    max_len = int(getattr(tokenizer, "model_max_length", 77) or 77)
    if max_len > 10_000:
        max_len = 77
    ws, wt = source_prompt.split(), target_prompt.split()
    if len(ws) != len(wt):
        raise InputError("target_prompt", f"has {len(wt)} words and the source prompt "
                         f"{len(ws)}", "a word swap of the source prompt (the same number of "
                         "words) for prompt-to-prompt replace",
                         "Use p2p_mode 'refine' to add or remove words.")
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    per_s, per_t = [ids(w) for w in ws], [ids(w) for w in wt]
    for prompt, per in ((source_prompt, per_s), (target_prompt, per_t)):
        if [i for p in per for i in p] != ids(" ".join(prompt.split())):
            raise InputError("target_prompt", "tokenizes differently word by word than as "
                             "a whole", "a tokenizer that splits at spaces (CLIP)",
                             "Use p2p_mode 'refine'.")
    M = torch.zeros(max_len, max_len)
    M[0, 0] = 1.0                                              # start of text
    i = j = 1
    for a, b in zip(per_s, per_t):
        if len(a) == len(b):
            for q in range(len(a)):
                if i + q < max_len and j + q < max_len:
                    M[i + q, j + q] = 1.0
        else:
            rows = [r for r in range(i, i + len(a)) if r < max_len]
            cols = [c for c in range(j, j + len(b)) if c < max_len]
            if rows and cols:
                M[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = 1.0 / len(b)
        i, j = i + len(a), j + len(b)
    for k in range(min(j, max_len), max_len):                  # end of text and padding
        M[min(max(k - (j - i), 0), max_len - 1), k] = 1.0
    return M


def token_alignment(source_ids: Sequence[int], target_ids: Sequence[int]) -> torch.Tensor:
    """For each target token position, the aligned source position, or -1 for a new token
    (prompt-to-prompt refine's alignment of the two token sequences).

    The alignment runs over the padded sequences, so past the prompt the end-of-text and
    padding tokens align with the source's shifted by the length difference."""
    import difflib

    mapper = torch.full((len(target_ids),), -1, dtype=torch.long)
    sm = difflib.SequenceMatcher(a=list(source_ids), b=list(target_ids), autojunk=False)
    for block in sm.get_matching_blocks():
        for k in range(block.size):
            mapper[block.b + k] = block.a + k
    return mapper


class InjectionHook(AttnHook):
    """Prompt-to-prompt injection (docs/algorithms.md section 3) on the conditional rows.

    Cross-attention, steps < cross_steps, every layer: with a 1-D ``mapper`` ("refine",
    from :func:`token_alignment`) the edit row's maps of tokens aligned with the source
    take the reconstruction row's maps and new tokens keep their own; with a 2-D mapper
    ("replace", from :func:`replace_mapper`) the edit row's maps are all the source maps
    mixed by the matrix. Self-attention, steps < self_steps, at the architecture's
    levels (``LayerChoices.injection_self_min_level``: "32x32 and below" at 512 px on SD
    1.x, i.e. latent / 2 and coarser; on SDXL every attention layer, since SDXL has none
    at the latent's own resolution): the edit row attends with the reconstruction row's
    queries and keys (its maps, exactly), in both modes. ``self_max_res`` overrides the
    levels as P2P states them, a map side at ``base_latent_res`` (64: SD 1.5's latent at
    512 px), so 32 means latent / 2 and coarser on every family and at every size."""

    def __init__(self, mapper: torch.Tensor, cross_steps: int, self_steps: int,
                 self_max_res: int | None = None, source: str = "rec", target: str = "edit",
                 base_latent_res: int = 64):
        if mapper.ndim not in (1, 2):
            raise ValueError("mapper must be a token alignment (1-D) or a replace matrix (2-D)")
        if self_max_res is not None and not self_max_res > 0:
            from .errors import InputError

            raise InputError("self_max_res", f"is {self_max_res}",
                             f"a map side at {base_latent_res}x{base_latent_res} latents "
                             "(SD 1.5 at 512 px), e.g. 32, or None for the model's levels")
        self.mapper = mapper
        self.mode = "replace" if mapper.ndim == 2 else "refine"
        self.cross_steps, self.self_steps = cross_steps, self_steps
        self.self_max_res = self_max_res
        self.source, self.target = source, target
        self.base_latent_res = base_latent_res
        # self-attention is injected at this level (latent / 2**level) and coarser
        self.self_min_level = SD1.layers.injection_self_min_level if self_max_res is None \
            else max(0, math.ceil(math.log2(base_latent_res / self_max_res) - 1e-9))
        # Host copy for host-side questions (which target tokens are aligned), so no
        # caller reads the mapper tensor element by element.
        self.aligned: list[int] | None = mapper.tolist() if mapper.ndim == 1 else None
        self._on: dict = {}

    def prepare(self, device, latent_hw, architecture: UNetArchitecture = SD1):
        if self.self_max_res is None:
            self.self_min_level = architecture.layers.injection_self_min_level
        self._device_mapper(torch.device(device), torch.float32)

    def injects_self(self, ctx, n_query: int) -> bool:
        """Whether a self-attention layer with ``n_query`` queries is at an injected level
        (its level read from its size against the call's latent)."""
        h, _ = layer_hw(ctx.latent_hw, n_query)
        return round(math.log2(ctx.latent_hw[0] / h)) >= self.self_min_level

    def _device_mapper(self, device, dtype):
        """The mapper on ``device`` (made once: a host tensor would be copied to the
        device in every layer of every step)."""
        key = ((host.device_key(device), str(dtype)) if self.mode == "replace"
               else (host.device_key(device),))
        got = self._on.get(key)
        if got is None:
            with grad_mode.normal_tensors():    # the edit rows' backward saves it
                if self.mode == "replace":
                    got = self.mapper.to(device, dtype)
                else:
                    m = self.mapper.to(device)
                    got = (m < 0, m.clamp(min=0))
            self._on[key] = got
        return got

    def inject_cross(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """The edit row's cross-attention probabilities (..., HW, L) after injection from
        the source row's ``src``; ``tgt`` are its own (kept for new tokens in refine)."""
        if self.mode == "replace":
            return src @ self._device_mapper(src.device, src.dtype)
        new, index = self._device_mapper(src.device, None)
        return torch.where(new, tgt, src.index_select(-1, index))

    def _pair(self, ctx):
        s, t = ctx.layout.index(self.source, COND), ctx.layout.index(self.target, COND)
        return (s, t) if s is not None and t is not None else None

    def qk_source(self, layer, ctx, n_query):
        pair = self._pair(ctx)
        if pair is None or layer.is_cross or ctx.step >= self.self_steps:
            return None
        return {pair[1]: pair[0]} if self.injects_self(ctx, n_query) else None

    def needs_probs(self, layer, ctx):
        return layer.is_cross and ctx.step < self.cross_steps and self._pair(ctx) is not None

    def edit_probs(self, layer, ctx, probs):
        if not self.needs_probs(layer, ctx):
            return probs
        s, t = self._pair(ctx)
        new_t = self.inject_cross(probs[s], probs[t])
        probs = probs.clone()
        probs[t] = new_t
        return probs
