"""MAG's frontier: UNet passes and time against distance from MAG-Edit's full schedule.

    python bench/mag_frontier.py --out bench/runs/<date>-cpu-frontier/frontier.json

Each example of ``example_data/`` (resized to 128 px) is inverted once (direct inversion)
and edited like edit_bench.py's fast mode (batched two-branch sampler, CAM on the
example's ``edit_words``, PFB ``object`` preset, MAG with the cached source and the
truncated loss forward) once per MAG setting of ``SETTINGS``. The first setting, ``ref``,
is MAG-Edit's: 15 iterations in each of the first half of the steps. For each setting:

* UNet passes of the sampling stage, counted (edit_bench.PassCounter: forwards, of which
  truncated, and backwards), and MAG's forward+backward pairs;
* CPU seconds of the sampling stage (``time.process_time``: all threads of this process)
  and wall seconds;
* the distance from ``ref``'s edit: mean |difference| of the edited latent and of the
  decoded image, inside the edit mask and outside it;
* the token-ratio loss and activation of the edit latent at the step where ``ref``'s
  optimisation ends (step n/2; no setting optimises past it): one probe forward, not
  counted, not timed. ``act`` is the mean token ratio the early exit's
  ``stop_activation`` compares with.

Random-weight tiny models: the numbers measure passes, time and numerical closeness to
the reference, never visual quality. The pass counts are exact and carry over to SD 1.5
(the same schedule makes the same passes); the times do not (see bench/RESULTS.md for
GPU pass costs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import edit_bench

from xmgie.mgie_core import vae
from xmgie.mgie_core.inversion import invert
from xmgie.mgie_core.mag import MAGControl
from xmgie.mgie_core.pfb import PFBControl
from xmgie.mgie_core.sampler import CAMSettings, edit

REF = dict(iterations=15, opt_fraction=0.5)
# name -> MAGControl settings (beyond the cached source and truncated forward, on in all).
# Pairs at 50 steps (25 optimised) in the comments.
SETTINGS = {
    "ref": REF,                                                              # 375
    "none": dict(REF, opt_fraction=0.0),                     # no updates (late blend only)
    # fewer iterations in every optimised step
    "it10": dict(REF, iterations=10),                                        # 250
    "it5": dict(REF, iterations=5),                          # 125: the fast mode so far
    "it3": dict(REF, iterations=3),                                          # 75
    "it2": dict(REF, iterations=2),                                          # 50
    "it1": dict(REF, iterations=1),                                          # 25
    # fewer optimised steps
    "opt0.3": dict(REF, opt_fraction=0.3),                                   # 225
    "opt0.2": dict(REF, opt_fraction=0.2),                                   # 150
    "opt0.16": dict(REF, opt_fraction=0.16),                                 # 120
    "opt0.12": dict(REF, opt_fraction=0.12),                                 # 90
    "opt0.1": dict(REF, opt_fraction=0.1),                                   # 75
    "opt0.08": dict(REF, opt_fraction=0.08),                                 # 60
    "opt0.2_it5": dict(REF, opt_fraction=0.2, iterations=5),                 # 50
    # full iterations for the first share of the optimised steps, then fewer
    "15>5@0.5": dict(REF, late_iterations=5, late_start=0.5),                # 255
    "15~1": dict(REF, late_iterations=1, late_start=0.0, schedule="linear"),  # 201
    "10~1": dict(REF, iterations=10, late_iterations=1, late_start=0.0,
                 schedule="linear"),                                         # 139
    "15>1@0.2": dict(REF, late_iterations=1, late_start=0.2),                # 95
    "5>2@0.5": dict(REF, iterations=5, late_iterations=2, late_start=0.5),   # 89
    "5~1": dict(REF, iterations=5, late_iterations=1, late_start=0.0,
                schedule="linear"),                                          # 77
    "15>1@0.1": dict(REF, late_iterations=1, late_start=0.1),                # 67
    "5>1@0.2": dict(REF, iterations=5, late_iterations=1, late_start=0.2),   # 45
    # early exit (one host read per optimised step)
    "exit_act@1": dict(REF, stop_activation="ACT", check_iteration=1),
    "exit_imp5%@1": dict(REF, stop_improvement=0.05, check_iteration=1),
    "exit_imp1%@2": dict(REF, stop_improvement=0.01, check_iteration=2),
}
# "ACT": the early exit's token-ratio target, set per run to the activation ``ref``
# reaches at its probe on the same example (what a full MAG run attains): the same edit
# strength, reached with fewer iterations where the latent gets there sooner.


class _Probe(MAGControl):
    """MAG that, at ``probe_step``, measures its loss and activation on the edit latent
    (no update, no gradient) and keeps the passes and seconds that cost apart."""

    probe_step: int = -1

    def before_step(self, run, i):
        if i == self.probe_step:
            from xmgie.mgie_core import guidance

            c = self._counter
            before = c.counts.get("sampling", {}).get("fwd", 0)
            t, w = time.process_time(), time.perf_counter()
            with torch.no_grad():
                z = run.latents["edit"]
                maps = guidance.edit_maps(run, z, i, self._layers)
                loss, act = self.loss(maps, tuple(z.shape[-2:]))
            self.probe = {"loss": float(loss), "act": float(act)}
            self.probe_cost = {"fwd": c.counts["sampling"]["fwd"] - before,
                               "cpu_s": time.process_time() - t,
                               "wall_s": time.perf_counter() - w}
        super().before_step(run, i)


def run_setting(sd, ex, inv, settings: dict, steps: int, counter) -> dict:
    mask = ex["mask_t"]
    ctl = _Probe(mask, list(ex["edit_words"]), truncate=True, cache_source=True, **settings)
    ctl.probe_step = int(round(REF["opt_fraction"] * steps))
    ctl._counter = counter
    counter.counts = {}
    counter.stage = "sampling"
    t, w = time.process_time(), time.perf_counter()
    try:
        res = edit(sd, inv, ex["target_prompt"], mask=mask,
                   cam=CAMSettings(in_words=list(ex["edit_words"])),
                   controls=[PFBControl(mask, preset="object"), ctl], batched=True,
                   keep_reconstruction=False)
    finally:
        counter.stage = None
    cpu, wall = time.process_time() - t, time.perf_counter() - w
    raw = counter.counts["sampling"]
    counts = {"fwd": raw["fwd"] - ctl.probe_cost["fwd"], "bwd": raw["bwd"],
              "truncated": raw["fwd"] - raw["completed"] - ctl.probe_cost["fwd"]}
    with torch.no_grad():
        image = vae.decode(sd, res.edit)
    return {"counts": counts, "mag_pairs": raw["bwd"],
            "cpu_s": cpu - ctl.probe_cost["cpu_s"], "wall_s": wall - ctl.probe_cost["wall_s"],
            "probe": ctl.probe, "stops": dict(ctl.stops), "latent": res.edit, "image": image}


def _masked_means(diff: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean |diff| inside and outside ``mask`` ([1,H,W], resized to diff's size)."""
    if diff.dim() == 4 and diff.shape[1] <= 4:               # latent (1,4,h,w)
        hw, d = diff.shape[-2:], diff.abs().mean(1)[0]
    else:                                                    # image (1,H,W,3)
        hw, d = diff.shape[1:3], diff.abs().mean(-1)[0]
    m = F.interpolate(mask[None].float(), size=tuple(hw), mode="area")[0, 0] > 0.5
    return float(d[m].mean()), float(d[~m].mean())


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50, help="sampling steps (ref: half "
                    "optimised, 15 iterations each)")
    ap.add_argument("--limit", type=int, default=None, help="first N examples")
    ap.add_argument("--examples", type=Path, default=edit_bench.DEFAULT_EXAMPLES)
    ap.add_argument("--settings", default="", help="comma-separated names (ref is always "
                    "run); default all")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady "
                    "times on a shared machine)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("XMGIE_NO_PROGRESS", "1")
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.settings.split(",") if n.strip()] or list(SETTINGS)
    bad = [n for n in names if n not in SETTINGS]
    if bad:
        raise SystemExit(f"unknown settings {bad}; choose from {', '.join(SETTINGS)}")
    names = ["ref"] + [n for n in names if n != "ref"]
    device = torch.device("cpu")
    sd = edit_bench.build_model("tiny", device, torch.float32)
    examples = edit_bench.load_examples(args.examples, 128, args.limit)
    counter = edit_bench.PassCounter(sd.unet)
    per: dict[str, list[dict]] = {n: [] for n in names}
    act_target = None
    try:
        for ex in examples:
            lat = vae.encode(sd, ex["image_t"])
            inv = invert(sd, lat.samples, ex["source_prompt"], "direct", args.steps,
                         edit_bench.GUIDANCE, image_size=lat.image_size)
            # warm-up: one short edit, untimed
            run_setting(sd, ex, inv, dict(REF, iterations=1), args.steps, counter)
            ref = None
            for n in names:
                s = dict(SETTINGS[n])
                if s.get("stop_activation") == "ACT":
                    s["stop_activation"] = act_target
                r = run_setting(sd, ex, inv, s, args.steps, counter)
                if n == "ref":
                    ref = r
                    # the target for the activation exit: ref's own activation here
                    act_target = round(r["probe"]["act"], 4)
                lat_in, lat_out = _masked_means(r["latent"] - ref["latent"], ex["mask_t"])
                img_in, img_out = _masked_means(r["image"] - ref["image"], ex["mask_t"])
                row = {"example": ex["name"], "settings": {k: v for k, v in s.items()},
                       "counts": r["counts"], "mag_pairs": r["mag_pairs"],
                       "cpu_s": r["cpu_s"], "wall_s": r["wall_s"],
                       "latent_diff": {"inside": lat_in, "outside": lat_out},
                       "image_diff": {"inside": img_in, "outside": img_out},
                       "probe": r["probe"], "stops": r["stops"]}
                per[n].append(row)
                print(f"{ex['name']:10s} {n:20s} pairs {r['mag_pairs']:4d} "
                      f"cpu {r['cpu_s']:6.2f} s  latent in/out {lat_in:.4f}/{lat_out:.4f}  "
                      f"loss {r['probe']['loss']:.4f} act {r['probe']['act']:.4f}",
                      flush=True)
    finally:
        counter.remove()
    results = {
        "config": {"size": "tiny", "image_px": 128, "steps": args.steps, "device": "cpu",
                   "dtype": "float32", "cpu_threads": torch.get_num_threads(),
                   "examples": [ex["name"] for ex in examples], "inversion": "direct",
                   "sampler": "batched, CAM on edit_words, PFB object preset",
                   "probe_step": int(round(REF["opt_fraction"] * args.steps)),
                   "torch": torch.__version__, "python": platform.python_version()},
        "settings": {n: SETTINGS[n] for n in names},
        "per_example": per,
        "summary": summarise(per),
    }
    print()
    print(markdown_table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))
    return results


def summarise(per: dict[str, list[dict]]) -> dict:
    out = {}
    for n, rows in per.items():
        def mean(f, rows=rows):
            return sum(f(r) for r in rows) / len(rows)

        out[n] = {
            "fwd": mean(lambda r: r["counts"]["fwd"]), "bwd": mean(lambda r: r["counts"]["bwd"]),
            "cpu_s": mean(lambda r: r["cpu_s"]),
            "latent_in": mean(lambda r: r["latent_diff"]["inside"]),
            "latent_out": mean(lambda r: r["latent_diff"]["outside"]),
            "image_in": mean(lambda r: r["image_diff"]["inside"]),
            "image_out": mean(lambda r: r["image_diff"]["outside"]),
            "loss": mean(lambda r: r["probe"]["loss"]),
            "act": mean(lambda r: r["probe"]["act"]),
            "early_exits": mean(lambda r: len(r["stops"])),
        }
    return out


def markdown_table(results: dict) -> str:
    """Means over the examples. ``of none``: the in-mask latent difference as a share of
    that of ``none`` (no MAG update at all): 0 is ref's edit, 1 as far as no MAG."""
    s = results["summary"]
    ref = s["ref"]
    none = s.get("none", {}).get("latent_in")
    lines = ["| setting | UNet fwd / bwd | MAG pairs (x ref) | CPU s (x ref) | latent diff in "
             "/ out | of none | image diff in / out | TR loss | act | exits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, v in s.items():
        share = f"{v['latent_in'] / none:.2f}" if none else "-"
        lines.append(
            f"| {n} | {v['fwd']:.0f} / {v['bwd']:.0f} | {v['bwd']:.0f} "
            f"({v['bwd'] / ref['bwd']:.2f}) | {v['cpu_s']:.2f} ({v['cpu_s'] / ref['cpu_s']:.2f})"
            f" | {v['latent_in']:.4f} / {v['latent_out']:.4f} | {share} | "
            f"{v['image_in']:.4f} / {v['image_out']:.4f} | {v['loss']:.4f} | {v['act']:.4f} | "
            f"{v['early_exits']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
