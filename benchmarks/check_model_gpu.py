"""Check the CUDA kernels on a real checkpoint's weights and activations against the CPU reference ops.

Two steps, since the GPU machine has neither the model weights nor the evaluation text:

    python benchmarks/check_model_gpu.py export CKPT golden.safetensors [--tokens 64]   # CPU
    python benchmarks/check_model_gpu.py check golden.safetensors                        # CUDA

``export`` runs the project's reference forward of CKPT on the evaluation text, records the input of every
quantized linear of the first and the last decoder layer (bf16, as served on GPUs) and stores, next to the
layer's packed INT4 weights and scales, what the CPU reference ops make of it: activation codes and scales (R4
Hadamard + quantization for down_proj, plain per-token quantization elsewhere), the int32 accumulators and the
bf16 output. ``check`` runs the same ``torch.ops.conqur.*`` ops on CUDA (the Triton kernels) and requires codes
and scales bit-exact (codes after a dense Hadamard factor may differ only at float32 rounding ties), the int32
accumulators bit-exact and the bf16 output within one bf16 rounding of the reference. Exits 1 on any failure;
writes ``check_model.json`` to ``$OUT`` when set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conqur_vllm.formats import pack_int4, unpack_int32
from conqur_vllm.hadamard import fast_hadamard_transform, hadamard_factors
from conqur_vllm.kernels import reference
from conqur_vllm.kernels.cuda import hadamard_quantize_per_token, reference_fn


def _capture_inputs(model: torch.nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The 2-D input of each named module during one forward of ``ids``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        module = model.get_submodule(name)
        hooks.append(module.register_forward_pre_hook(
            lambda _m, args, name=name: seen.__setitem__(name, args[0].detach().reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return seen


def export(ckpt: Path, out: Path, tokens: int) -> None:
    """Write the golden file of ``ckpt`` (see the module docstring)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from conqur_vllm.assets import evaluation_text
    from conqur_vllm.checkpoint import read_checkpoint_tensors
    from conqur_vllm.fake_quant import QuantLinear
    from conqur_vllm.reference import load_reference_model

    model, qcfg = load_reference_model(ckpt, torch.float32)
    layers = model.config.num_hidden_layers
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)
             and (".layers.0." in n or f".layers.{layers - 1}." in n)]
    ids = AutoTokenizer.from_pretrained(ckpt)(evaluation_text()[:20000], return_tensors="pt")["input_ids"]
    inputs = _capture_inputs(model, names, ids[:, :tokens])
    tensors = read_checkpoint_tensors(ckpt)
    r4 = qcfg.transform("down_proj_input")
    bits, clip = qcfg.activations.num_bits, qcfg.activations.clip_ratio
    golden: dict[str, torch.Tensor] = {}
    sites = []
    for i, name in enumerate(names):
        x = inputs[name].to(torch.bfloat16).contiguous()
        k = x.shape[1]
        codes = unpack_int32(tensors[f"{name}.weight_packed"], 4, k, packed_dim=1, signed=True)
        w_scale = tensors[f"{name}.weight_scale"].to(torch.float32)
        block = -1
        if name.endswith("down_proj") and r4 is not None:
            block = 0 if r4.block_size == r4.size else r4.block_size
            a_q, a_scale = reference_fn(hadamard_quantize_per_token)(x, block, bits, clip)
        else:
            a_q, a_scale = reference_fn(reference.quantize_per_token)(x, bits, clip)
        golden |= {f"{i}.x": x, f"{i}.b_packed": pack_int4(codes), f"{i}.w_scale": w_scale, f"{i}.a_q": a_q,
                   f"{i}.a_scale": a_scale, f"{i}.acc": reference.int_matmul(a_q, codes),
                   f"{i}.out": reference_fn(reference.int_scaled_mm)(a_q, a_scale, codes, w_scale, None,
                                                                      torch.bfloat16)}
        sites.append({"name": name, "block": block, "bits": bits, "clip": clip, "M": x.shape[0], "K": k,
                      "N": codes.shape[0]})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(golden, str(out), metadata={"sites": json.dumps(sites), "checkpoint": str(ckpt)})
    print(f"wrote {len(sites)} sites ({', '.join(s['name'].split('.', 2)[-1] for s in sites)}) to {out}")


def check_site(site: dict, g: dict[str, torch.Tensor], i: int) -> dict:
    """Run one site's ops on CUDA and compare them with the golden results."""
    dev = torch.device("cuda")
    x, b_packed, w_scale = g[f"{i}.x"].to(dev), g[f"{i}.b_packed"].to(dev), g[f"{i}.w_scale"].to(dev)
    ref_q, ref_s = g[f"{i}.a_q"].to(dev), g[f"{i}.a_scale"].to(dev)
    bits, clip, block = site["bits"], site["clip"], site["block"]
    if block >= 0:
        q, s = torch.ops.conqur.hadamard_quantize_per_token(x, block, bits, clip)
        size = x.shape[1] if block == 0 else block
        dense = hadamard_factors(size)[0] > 1
        y = fast_hadamard_transform(x.float(), block or None)
    else:
        q, s = torch.ops.conqur.quantize_per_token(x, bits, clip, None)
        dense, y = False, x.float()
    from check_kernels_gpu import dense_codes_ok

    diff = q != ref_q
    scale_err = float(((s - ref_s).abs() / ref_s).max())
    codes_ok = dense_codes_ok(q, s, ref_q, ref_s, y) if dense else not bool(diff.any())
    scales_ok = scale_err < 1e-6 if dense else torch.equal(s, ref_s)
    from conqur_vllm.kernels import triton_gemm

    acc = triton_gemm.int_mm(ref_q, b_packed)
    out = torch.ops.conqur.int4_scaled_mm(ref_q, ref_s, b_packed, w_scale, None, torch.bfloat16)
    ref_out = g[f"{i}.out"].to(dev).float()
    err = (out.float() - ref_out).abs()
    out_ok = bool((err <= 2.0**-7 * ref_out.abs() + 1e-6 * float(ref_out.abs().max())).all())
    served = torch.ops.conqur.int4_scaled_mm(q, s, b_packed, w_scale, None, torch.bfloat16).float()
    return {**site, "code_mismatches": int(diff.sum()), "codes_ok": codes_ok, "scale_max_rel_err": scale_err,
            "scales_ok": bool(scales_ok), "acc_exact": torch.equal(acc, g[f"{i}.acc"].to(dev)), "out_ok": out_ok,
            "out_rel_err": float((out.float() - ref_out).norm() / ref_out.norm()),
            "served_rel_err": float((served - ref_out).norm() / ref_out.norm())}


def check(golden: Path) -> None:
    """Check every site of ``golden`` on CUDA; print a table and exit 1 on any failure."""
    from kernels import require_cuda
    from safetensors import safe_open
    from safetensors.torch import load_file

    require_cuda("checked")
    with safe_open(str(golden), "pt") as f:
        sites = json.loads(f.metadata()["sites"])
    g = load_file(str(golden))
    rows = [check_site(site, g, i) for i, site in enumerate(sites)]
    failed = [r for r in rows if not (r["codes_ok"] and r["scales_ok"] and r["acc_exact"] and r["out_ok"])]
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "check_model.json").write_text(json.dumps(rows, indent=1))
    print("| site | M | K | N | R4 block | code mismatches | scales | int32 acc | bf16 out rel err | served rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['M']} | {r['K']} | {r['N']} | {r['block'] if r['block'] >= 0 else '-'} | "
              f"{r['code_mismatches']} | {'ok' if r['scales_ok'] else 'DIFFER'} | "
              f"{'exact' if r['acc_exact'] else 'DIFFER'} | {r['out_rel_err']:.1e} | {r['served_rel_err']:.1e} |")
    print(f"{len(rows) - len(failed)}/{len(rows)} sites passed on {torch.cuda.get_device_name(0)}")
    sys.exit(1 if failed else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="CPU: real activations and reference results of a checkpoint")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("golden", type=Path)
    e.add_argument("--tokens", type=int, default=64, help="evaluation-text tokens per forward (default 64)")
    c = sub.add_parser("check", help="CUDA: the Triton kernels against a golden file")
    c.add_argument("golden", type=Path)
    args = parser.parse_args()
    if args.cmd == "export":
        export(args.checkpoint, args.golden, args.tokens)
    else:
        check(args.golden)


if __name__ == "__main__":
    main()
