"""Online ConQuR: learn R1 and R2 mini-batch by mini-batch through the model (optionally fake-quantized).

Each step runs one mini-batch through the model with the current rotations fused (with
``quantized_forward``, weights, activations and KV fake-quantized; :class:`CalibrationOptions` turns it on
for RTN runs only, see benchmarks/RESULTS.md), folds the normalized site vectors into each site's d x d
moment, re-solves the rotations by Procrustes and fuses the *change* of rotation into the weights (float32 on this scratch model:
the caller fuses the learned rotations into the original weights in float64). Only the current
mini-batch's vectors exist at any time; the state kept across steps is one moment per site.

Sites: R1 pools the residual-stream inputs of both RMSNorms of every layer and of the final norm, plus (joint
objective, ``weight_mu`` > 0) the normalized rows of the reader weights q/k/v/gate/up, which R1 rotates exactly
like the activations. R2 has one site per layer and KV head, pooling that head's value vectors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from conqur_vllm import fake_quant
from conqur_vllm.calibration.layerwise import module_device
from conqur_vllm.calibration.options import ConqurOptions
from conqur_vllm.models.adapters import ModelAdapter
from conqur_vllm.quant import QuantSpec
from conqur_vllm.rotation.conqur import CornerSite, Target, corners, grid_target, normalize_rows
from conqur_vllm.rotation.fuse import rotate_residual, rotate_residual_ends, rotate_values
from conqur_vllm.rotation.rotations import Rotations, head_dim_of

MAX_WEIGHT_ROWS = 16384


@dataclass
class StepLog:
    step: int
    seconds: float
    r1_before: float
    r1_after: float
    r2_before: float
    r2_after: float
    heldout_loss: float | None = None  # after this update (``select="heldout"``)

    def line(self) -> str:
        loss = "" if self.heldout_loss is None else f", held-out loss {self.heldout_loss:.4f}"
        return (f"conqur step {self.step:3d}: R1 objective {self.r1_before:.4f} -> {self.r1_after:.4f}, "
                f"R2 {self.r2_before:.4f} -> {self.r2_after:.4f}{loss} ({self.seconds:.1f}s)")


@dataclass
class LearnReport:
    steps: list[StepLog] = field(default_factory=list)
    r1_initial: float | None = None
    r2_initial: float | None = None
    heldout_initial: float | None = None  # held-out loss of the starting rotations
    selected_step: int | None = None  # the update kept (-1: the start); None: the last one, no selection

    def to_dict(self) -> dict:
        return {"r1_objective_initial": self.r1_initial, "r2_objective_initial": self.r2_initial,
                "heldout_loss_initial": self.heldout_initial, "selected_step": self.selected_step,
                "steps": [s.__dict__ for s in self.steps]}


def reader_weight_rows(model: nn.Module, adapter: ModelAdapter, r1: torch.Tensor, seed: int) -> torch.Tensor:
    """Normalized reader weight rows in the original (un-rotated) coordinates, sub-sampled to a fixed cap."""
    mats = [layer.get_submodule(p).weight.detach() for layer in adapter.decoder_layers(model)
            for p in (*adapter.attn_readers, *adapter.mlp_readers)]
    sizes = torch.tensor([m.shape[0] for m in mats])
    total = int(sizes.sum())
    idx = torch.arange(total)
    if total > MAX_WEIGHT_ROWS:
        idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:MAX_WEIGHT_ROWS]
    # gather the chosen rows matrix by matrix: never a concatenated copy of all reader weights
    starts = torch.cumsum(sizes, 0) - sizes
    owner = torch.searchsorted(starts, idx, right=True) - 1
    w = torch.empty(len(idx), mats[0].shape[1], dtype=torch.float64)
    for j, mat in enumerate(mats):
        pick = (owner == j).nonzero().squeeze(1)
        if len(pick):
            w[pick] = mat[idx[pick] - starts[j]].to(torch.float64)
    return normalize_rows(w, dtype=torch.float32) @ r1.to(torch.float32).T


class _SiteRecorder:
    """Forward hooks that collect one mini-batch's R1 and R2 site vectors (rotated coordinates).

    R1 vectors are sampled as they arrive (the same seeded number of tokens from every residual input, at most
    ``max_vectors`` in all), so the full mini-batch of residual states is never held at once.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, n_kv: int, head_dim: int,
                 max_vectors: int, center: bool = False) -> None:
        self.center = center
        self.residual: list[torch.Tensor] = []
        self.values: dict[int, torch.Tensor] = {}
        self.handles = []
        self.paused = False  # e.g. while the model is scored on held-out windows
        self.generator = torch.Generator()
        norms = []
        for layer in adapter.decoder_layers(model):
            norms += [layer.get_submodule(adapter.attn_norm), layer.get_submodule(adapter.mlp_norm)]
        norms.append(model.get_submodule(adapter.final_norm))
        self.per_site = -(-max_vectors // len(norms))
        for norm in norms:
            self.handles.append(norm.register_forward_pre_hook(self._record_residual))
        for li, layer in enumerate(adapter.decoder_layers(model)):
            def grab(_m, _args, out, _li=li):
                if self.paused:
                    return
                self.values[_li] = out.detach().reshape(-1, n_kv, head_dim)
            self.handles.append(layer.get_submodule(adapter.v_proj).register_forward_hook(grab))

    def _record_residual(self, _module, args):
        if self.paused:
            return
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        if self.center:  # what a shifted quantizer reads: the normalized input minus its mean over the batch
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            x = x - x.mean(0)
        if x.shape[0] > self.per_site:  # indexing copies: the full input is not kept alive
            self.residual.append(x[torch.randperm(x.shape[0], generator=self.generator)[: self.per_site]])
        else:
            self.residual.append(x.clone())

    def clear(self, seed: int) -> None:
        self.residual.clear()
        self.values.clear()
        self.generator.manual_seed(seed)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _token_weights(x: torch.Tensor, massive_weight: float) -> torch.Tensor | None:
    if massive_weight == 1.0:
        return None
    norms = x.norm(dim=-1)
    return torch.where(norms > 8 * norms.median(), massive_weight, 1.0).to(torch.float64)


def learn_rotations(model: nn.Module, adapter: ModelAdapter, rot: Rotations, batches: list[torch.Tensor],
                    opts: ConqurOptions, *, weight_spec: QuantSpec | None,
                    act_spec: QuantSpec | None = None, value_spec: QuantSpec | None = None,
                    heldout: torch.Tensor | None = None, seed: int = 0, progress: bool = True,
                    on_step: Callable[[StepLog], None] | None = None,
                    on_rotations: Callable[[int, Rotations], None] | None = None) -> tuple[Rotations, LearnReport]:
    """Run ``opts.steps`` online updates over ``batches`` (cycled); the model ends with the learned rotations fused.

    ``rot`` must already be applied to ``model`` (:func:`conqur_vllm.rotation.apply_rotations`); it runs where
    ``model`` is.
    ``weight_spec``: weights are RTN fake-quantized (absmax, no clip search) in the forward when given and
    ``opts.quantized_forward``. With ``opts.target == "grid"`` the R1 targets lie on ``act_spec``'s grid (weight
    rows on ``weight_spec``'s) and the R2 targets on ``value_spec``'s; a missing spec falls back to corners.
    ``heldout`` (token windows, needed by ``opts.select == "heldout"``): after every update the model, with the
    quantizers it came with and RTN weights (``weight_spec``), is scored by its loss on these windows, and the
    best rotations, the start included, are kept. ``on_rotations(step, rotations)`` sees every update's result.
    """
    if opts.select == "heldout" and heldout is None:
        raise ValueError("select='heldout' needs held-out windows (pipeline.heldout_windows)")
    cfg = model.config
    n_layers = len(adapter.decoder_layers(model))
    n_kv, hd = cfg.num_key_value_heads, head_dim_of(cfg)
    r2_init = rot.r2.to(torch.float64)
    r2_init = r2_init.expand(n_layers, n_kv, hd, hd) if r2_init.dim() == 2 else r2_init
    def target(spec: QuantSpec | None) -> Target:
        return grid_target(spec) if opts.target == "grid" and spec is not None else corners

    site1 = CornerSite(rot.r1.to(torch.float64).clone(), opts.accumulate, opts.ema_decay,
                       target=target(act_spec), extra_target=target(weight_spec))
    # every layer's and KV head's R2 is its own site; they are updated together as one batched site
    site2 = (CornerSite(r2_init.reshape(n_layers * n_kv, hd, hd).clone(), opts.accumulate, opts.ema_decay,
                        target=target(value_spec)) if opts.learn_r2 else None)
    rows = reader_weight_rows(model, adapter, site1.rotation, seed) if opts.weight_mu > 0 else None
    quantized = opts.quantized_forward
    saved = fake_quant.SavedQuantizers.of(model, adapter)
    learner_act = saved.acts if quantized else fake_quant.ActQuant(bits=None)
    learner_attn = saved.simulations if quantized else [fake_quant.AttentionSim(r3=rot.r3)] * n_layers
    learner_weights = weight_spec if quantized else None

    def use_quantizers(act: dict | fake_quant.ActQuant, attn: list, weights: QuantSpec | None) -> None:
        saved.use(act, attn)
        fake_quant.set_weight_fake_quant(model, weights, clip_search=False)

    def heldout_loss() -> float:
        """Mean next-token loss of the fully fake-quantized model (the LM head is still in the start basis)."""
        use_quantizers(saved.acts, saved.simulations, weight_spec)
        recorder.paused = True
        try:
            total = 0.0
            with torch.no_grad():
                for ids in heldout:
                    hidden = decoder(ids[None].to(device), use_cache=False).last_hidden_state
                    logits = head(hidden @ pending32[0].T.to(hidden.dtype))[0, :-1].float()
                    total += float(F.cross_entropy(logits, ids[1:].to(logits.device)))
            return total / len(heldout)
        finally:
            recorder.paused = False
            use_quantizers(learner_act, learner_attn, learner_weights)

    recorder = _SiteRecorder(model, adapter, n_kv, hd, opts.max_vectors, center=bool(opts.center))
    decoder = model.get_decoder()  # hidden states only: the LM head's logits are not needed here
    device = module_device(model)
    # the embedding (vocab x d) is rotated on its output while learning and fused once at the end
    pending = torch.eye(cfg.hidden_size, dtype=torch.float64)
    pending32 = [pending.float()]
    embed_hook = model.get_submodule(adapter.embed).register_forward_hook(
        lambda _m, _a, out: out @ pending32[0].to(out.dtype))
    head = model.get_submodule(adapter.lm_head)
    report = LearnReport()
    best: tuple[float, int, torch.Tensor, torch.Tensor | None] | None = None  # loss, step, R1, R2
    try:
        use_quantizers(learner_act, learner_attn, learner_weights)  # inside the try: the finally restores them
        if opts.select == "heldout":
            report.heldout_initial = heldout_loss()
            best = (report.heldout_initial, -1, site1.rotation, site2.rotation if site2 is not None else None)
        bar = tqdm(range(opts.steps), desc="conqur rotations", disable=not progress)
        for step in bar:
            t0 = time.perf_counter()
            recorder.clear(seed * 100003 + step)
            with torch.no_grad():
                decoder(batches[step % len(batches)].to(device), use_cache=False)
            old_r1 = site1.rotation
            x1 = torch.cat(recorder.residual)
            recorder.residual.clear()
            u1 = normalize_rows(x1, dtype=torch.float32) @ old_r1.to(torch.float32).T
            w1 = _token_weights(x1, opts.massive_token_weight)
            extra = opts.weight_mu * u1.shape[0] if rows is not None else 0.0
            b1, a1 = site1.update(u1, weights=w1, extra_u=rows, extra_scale=extra, alternations=opts.alternations)
            if report.r1_initial is None:
                report.r1_initial = b1
            delta1 = old_r1.T @ site1.rotation
            b2 = a2 = 0.0
            if site2 is not None:
                old_r2 = site2.rotation
                v = torch.stack([recorder.values[li] for li in range(n_layers)], dim=1)  # tokens, L, K, hd
                v = v.reshape(v.shape[0], n_layers * n_kv, hd).transpose(0, 1).float()
                u2 = (v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ old_r2.mT.float()
                b2, a2 = site2.update(u2, alternations=opts.alternations)
                if report.r2_initial is None:
                    report.r2_initial = b2
                deltas = (old_r2.mT @ site2.rotation).reshape(n_layers, n_kv, hd, hd)
            rotate_residual(model, adapter, delta1, ends=False, precision=torch.float32)
            pending = pending @ delta1
            pending32[0] = pending.float()
            if site2 is not None:
                rotate_values(model, adapter, deltas)
            loss = None
            if best is not None:
                loss = heldout_loss()
                if loss < best[0]:
                    best = (loss, step, site1.rotation, site2.rotation if site2 is not None else None)
            log = StepLog(step, time.perf_counter() - t0, b1, a1, b2, a2, loss)
            report.steps.append(log)
            if progress:
                bar.write(log.line())
            if on_step is not None:
                on_step(log)
            if on_rotations is not None:
                r2_now = site2.rotation.reshape(n_layers, n_kv, hd, hd) if site2 is not None else rot.r2
                on_rotations(step, Rotations(r1=site1.rotation, r2=r2_now, r3=rot.r3, r4=rot.r4,
                                             r4_block=rot.r4_block))
        if best is not None:
            report.selected_step = best[1]
            if best[1] != opts.steps - 1:
                _return_to(model, adapter, site1, site2, best[2], best[3], n_layers, n_kv)
                pending = pending @ (site1.rotation.T @ best[2])
                site1.rotation = best[2]
                if site2 is not None:
                    site2.rotation = best[3]
    finally:
        recorder.remove()
        embed_hook.remove()
        rotate_residual_ends(model, adapter, pending)
        fake_quant.set_weight_fake_quant(model, None)
        saved.restore()
    r2 = site2.rotation.reshape(n_layers, n_kv, hd, hd) if site2 is not None else rot.r2
    return Rotations(r1=site1.rotation, r2=r2, r3=rot.r3, r4=rot.r4, r4_block=rot.r4_block), report


def _return_to(model: nn.Module, adapter: ModelAdapter, site1: CornerSite, site2: CornerSite | None,
               r1: torch.Tensor, r2: torch.Tensor | None, n_layers: int, n_kv: int) -> None:
    """Fuse the change from the sites' current rotations back to a kept snapshot (not the embedding/head)."""
    rotate_residual(model, adapter, site1.rotation.T @ r1, ends=False, precision=torch.float32)
    if site2 is not None:
        hd = r2.shape[-1]
        rotate_values(model, adapter, (site2.rotation.mT @ r2).reshape(n_layers, n_kv, hd, hd))

