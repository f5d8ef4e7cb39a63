"""Per-layer transforms at each activation site: is one shared R1 the limit, and what does a mean shift give?

R1 is one rotation for the residual-stream inputs of every layer (the q/k/v and gate/up inputs), because it is
fused into the residual stream. A per-layer rotation P at one input would have to run online (as R4 does), at
the cost of a transform per token. This measures what such rotations could give at most: on the W16A4KV4 proxy
(full-precision weights, so rotating the input and the weight by P is the same as quantizing ``x P`` and
rotating back), every layer's chosen input groups get their own dense orthogonal P, learned by the same online
corner/Procrustes rule on that input's own vectors (full-precision forward, running sum, the calibration text),
starting from the identity (= the shared rotations alone). ``--target grid`` aims at the quantizer's grid instead
of the corners. ``shift`` quantizes each chosen input around its mean over the calibration batches (``x - mu``,
with ``W mu`` as a bias: what ``a_shift`` serves); ``shift-corner`` / ``shift-grid`` learn P on the centered
inputs. The shared rotations are calibrated with ``a_shift`` off. Selection text only.

    .venv/bin/python benchmarks/site_transforms.py --seeds 0,1,2 --json benchmarks/results/site-transforms-w16a4.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from conqur_vllm import assets, fake_quant
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.options import CalibrationOptions
from conqur_vllm.eval.perplexity import perplexity, tokenize_windows
from conqur_vllm.models.adapters import get_adapter
from conqur_vllm.quant import activation_spec
from conqur_vllm.rotation.conqur import CornerSite, corners, grid_target, normalize_rows

GROUPS = {"qkv": 0, "o": 1, "gate_up": 2, "down": 3}


@dataclass
class SiteTransform:
    """Quantize ``(x - mu) P``, rotate back and add mu: the W16 equivalent of an online rotation P fused into the
    weight and of a shift mu whose product with the weight becomes a bias."""

    inner: fake_quant.ActQuant
    rotation: torch.Tensor | None = None
    shift: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift is not None:
            x = x - self.shift.to(x.dtype)
        if self.rotation is not None:
            p = self.rotation.to(x.dtype)
            x = self.inner(x @ p) @ p.T
        else:
            x = self.inner(x)
        return x if self.shift is None else x + self.shift.to(x.dtype)


@dataclass
class _Recorder:
    """An activation 'quantizer' that passes x through and keeps its rows (float32) for one site."""

    rows: list

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.detach().reshape(-1, x.shape[-1]).float())
        return x


def _stream_site_inputs(model, batches: list[torch.Tensor], groups: list[str], on_batch) -> None:
    """Full-precision forward of every batch; ``on_batch({(layer, group): rows})`` after each."""
    adapter = get_adapter(model.config)
    recorders = {(li, name): _Recorder(rows=[]) for li in range(len(adapter.decoder_layers(model)))
                 for name in groups}
    saved = {id(m): m.act for m in model.modules() if isinstance(m, fake_quant.QuantLinear)}
    fake_quant.set_activation_quant(model, fake_quant.ActQuant(bits=None))
    for (li, name), rec in recorders.items():
        adapter.decoder_layers(model)[li].get_submodule(adapter.input_groups[GROUPS[name]][0]).act = rec
    try:
        for batch in batches:
            with torch.no_grad():
                model(batch, use_cache=False)
            on_batch({key: torch.cat(rec.rows) for key, rec in recorders.items()})
            for rec in recorders.values():
                rec.rows.clear()
    finally:
        for m in model.modules():
            if isinstance(m, fake_quant.QuantLinear):
                m.act = saved[id(m)]


def site_means(model, batches: list[torch.Tensor], groups: list[str]) -> dict[tuple[int, str], torch.Tensor]:
    """Mean input vector of every layer's chosen input groups over the calibration batches (float64)."""
    sums: dict = {}
    count = [0]

    def add(rows: dict) -> None:
        for key, x in rows.items():
            sums[key] = sums.get(key, 0.0) + x.double().sum(0)
        count[0] += next(iter(rows.values())).shape[0]

    _stream_site_inputs(model, batches, groups, add)
    return {key: s / count[0] for key, s in sums.items()}


def learn_site_rotations(model, batches: list[torch.Tensor], groups: list[str], target: str,
                         act: fake_quant.ActQuant, alternations: int,
                         shifts: dict | None = None) -> dict[tuple[int, str], CornerSite]:
    """One corner site per layer and input group (identity start), updated once per calibration batch on the
    site's (optionally centered) inputs."""
    aim = corners if target == "corner" else grid_target(activation_spec(act.bits, act.clip_ratio))
    sites: dict = {}

    def update(rows: dict) -> None:
        for key, x in rows.items():
            if shifts is not None:
                x = x - shifts[key].float()
            site = sites.setdefault(key, CornerSite(rotation=torch.eye(x.shape[-1], dtype=torch.float64),
                                                    target=aim))
            site.update(normalize_rows(x, dtype=torch.float32), alternations=alternations)

    _stream_site_inputs(model, batches, groups, update)
    return sites


def install_site_transforms(model, act: fake_quant.ActQuant, rotations: dict | None, shifts: dict | None) -> None:
    adapter = get_adapter(model.config)
    layers = adapter.decoder_layers(model)
    for key in (rotations or shifts):
        li, name = key
        wrapped = SiteTransform(inner=act, rotation=None if rotations is None else rotations[key].rotation.float(),
                                shift=None if shifts is None else shifts[key].float())
        for path in adapter.input_groups[GROUPS[name]]:
            layers[li].get_submodule(path).act = wrapped


KINDS = ("corner", "grid", "shift", "shift-corner", "shift-grid")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--method", choices=("quarot", "conqur"), default="quarot")
    ap.add_argument("--variants", default="corner:qkv+gate_up,grid:qkv+gate_up,corner:qkv+gate_up+o",
                    help=f"KIND:GROUP+GROUP,... with KIND in {KINDS} and GROUP in {tuple(GROUPS)}")
    ap.add_argument("--alternations", type=int, default=1)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--eval-text", default="technical")
    ap.add_argument("--calib", default='{"w_bits": 16, "a_clip": 0.75}', help="JSON CalibrationOptions overrides")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.eval_text in ("wiki", "c4"):
        raise SystemExit(f"{args.eval_text} is the reported or the calibration text; use another")
    variants = [(v.split(":")[0], v.split(":")[1].split("+")) for v in args.variants.split(",")]
    for kind, groups in variants:
        if kind not in KINDS or not set(groups) <= set(GROUPS):
            raise SystemExit(f"bad variant {kind}:{'+'.join(groups)}; use KIND:GROUP+... with KIND in {KINDS} "
                             f"and GROUP in {list(GROUPS)}")
    fp_model, tokenizer = pipeline.load_model(assets.smollm2_dir())
    calib_text = assets.calibration_text()
    windows = tokenize_windows(tokenizer, assets.load_text(args.eval_text), 512, max_windows=args.windows)

    def ppl(model) -> float:
        with torch.no_grad():
            return perplexity(lambda ids: model(ids, use_cache=False).logits, windows, progress=False)

    results = [{"seed": None, "variant": "fp", "ppl": ppl(fp_model)}]
    for seed in (int(s) for s in args.seeds.split(",")):
        calib = {"a_shift": False, **json.loads(args.calib)}  # the variants add their own shifts
        opts = CalibrationOptions(method=args.method, seed=seed, embed_bits=16, head_bits=16, **calib)
        model = copy.deepcopy(fp_model)
        used = pipeline.calibrate_model(model, tokenizer, opts, calib_text, progress=False).options
        act = fake_quant.ActQuant(bits=used.a_bits, clip_ratio=used.a_clip)
        batches = pipeline.calibration_batches(tokenizer, calib_text, used.samples, used.seq_len,
                                               used.conqur.batch_size, seed)
        rows = [("shared only", model)]
        for kind, groups in variants:
            probe = copy.deepcopy(model)
            shifts = site_means(probe, batches, groups) if kind.startswith("shift") else None
            sites = None
            if kind != "shift":
                target = kind.removeprefix("shift-")
                sites = learn_site_rotations(probe, batches, groups, target, act, args.alternations, shifts)
                before = statistics.mean(s.history[0] for s in sites.values())
                after = statistics.mean(s.history[-1] for s in sites.values())
                print(f"seed {seed} {kind}:{'+'.join(groups)}: site objective after first / last update "
                      f"{before:.4f} / {after:.4f}", file=sys.stderr, flush=True)
            install_site_transforms(probe, act, sites, shifts)
            rows.append((f"{kind}:{'+'.join(groups)}", probe))
        for name, m in rows:
            results.append({"seed": seed, "variant": name, "ppl": ppl(m)})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print_table(results)
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "method": args.method, "eval_text": args.eval_text, "calib": json.loads(args.calib)}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


def print_table(results: list[dict]) -> None:
    """Perplexity per variant and seed, and each variant's gap to FP paired with the shared-only gap."""
    fp = results[0]["ppl"]
    seeds = sorted({r["seed"] for r in results[1:]})
    names = list(dict.fromkeys(r["variant"] for r in results[1:]))
    at = {(r["seed"], r["variant"]): r["ppl"] for r in results[1:]}
    print(f"\nFP {fp:.2f}\n{'variant':<28} " + " ".join(f"{f'seed {s}':>8}" for s in seeds) + f" {'mean':>8} {'paired gap ratio':>18}")
    for name in names:
        vals = [at[(s, name)] for s in seeds]
        ratios = [(at[(s, name)] - fp) / (at[(s, 'shared only')] - fp) for s in seeds]
        spread = f" ± {statistics.stdev(ratios):.3f}" if len(ratios) > 1 else ""
        print(f"{name:<28} " + " ".join(f"{v:8.2f}" for v in vals) + f" {statistics.mean(vals):8.2f}"
              f" {statistics.mean(ratios):10.3f}{spread}")


if __name__ == "__main__":
    main()
