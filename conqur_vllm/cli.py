"""The ``conqur`` command: calibrate, eval, serve, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_OUT = "out/smollm2-conqur-w4a4kv4"


def _clip_ratio(value: str, allow_auto: bool = True) -> float | str:
    """A clip ratio in (0, 1], or ``auto``; anything else is a one-line argparse error."""
    if allow_auto and value == "auto":
        return value
    try:
        ratio = float(value)
    except ValueError:
        ratio = float("nan")
    if not 0.0 < ratio <= 1.0:
        choices = "a number in (0, 1] or auto" if allow_auto else "a number in (0, 1]"
        raise argparse.ArgumentTypeError(f"{value!r} is not a clip ratio: pass {choices}")
    return ratio


def _add_calibration_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=["conqur", "quarot", "none"], default="conqur")
    p.add_argument("--w-bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--a-bits", type=int, choices=[4, 8, 16], default=4)
    p.add_argument("--kv-bits", type=int, choices=[4, 8, 16], default=4)
    p.add_argument("--a-clip", type=_clip_ratio, default=None,
                   help="activation clip ratio, or auto: the grid ratio with the least quantization error on "
                        "the calibration data (default: the calibrator's)")
    p.add_argument("--kv-clip", type=lambda v: _clip_ratio(v, allow_auto=False), default=None,
                   help="KV cache clip ratio (default: the calibrator's)")
    p.add_argument("--a-shift", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize the q/k/v, o_proj and gate/up inputs around their calibration mean (served as "
                        "a shift and a bias; default on)")
    p.add_argument("--kv-shift", action=argparse.BooleanOptionalAction, default=True,
                   help="subtract each layer's calibration-mean key before the KV quantizer (exact for attention; "
                        "default on)")
    p.add_argument("--smooth", choices=["none", "down", "writers", "all"], default=None,
                   help="per-channel smoothing scales fused into the model, chosen per layer on calibration data: "
                        "down: at the down_proj input; writers: also the o_proj input; all: also q/k/v and gate/up "
                        "(default: the calibrator's)")
    p.add_argument("--layer-clips", action=argparse.BooleanOptionalAction, default=None,
                   help="also choose an activation clip ratio per layer and input group (default: on with an "
                        "automatic --a-clip, except for --method quarot with GPTQ)")
    p.add_argument("--a-symmetric", action=argparse.BooleanOptionalAction, default=False,
                   help="symmetric per-token activation codes (default off: a zero point per token)")
    p.add_argument("--weight-quantizer", choices=["gptq", "rtn"], default="gptq")
    p.add_argument("--group-size", type=int, default=None, help="weight group size (default: per channel)")
    p.add_argument("--weight-symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric INT4 weight codes; --no-weight-symmetric: a zero point per channel (group) "
                        "(default: symmetric for GPTQ, asymmetric for RTN)")
    p.add_argument("--gptq-inputs", choices=["fp-activations", "quantized", "asymmetric"], default=None,
                   help="what GPTQ's Hessians see: activations unquantized (QuaRot's way), the served model's "
                        "quantized inputs, or those aiming at the full-precision model's outputs (default: "
                        "asymmetric)")
    p.add_argument("--gptq-residual-target", action=argparse.BooleanOptionalAction, default=None,
                   help="asymmetric GPTQ: o_proj and down_proj also aim at the residual stream's accumulated error "
                        "(default: on with --gptq-inputs asymmetric)")
    p.add_argument("--gptq-damp", type=float, default=None,
                   help="GPTQ's damping of each decoder linear's Hessian, a multiple of its mean diagonal "
                        "(default 0.01, as in the reference GPTQ)")
    p.add_argument("--embed-bits", type=int, choices=[4, 8, 16], default=4,
                   help="token embedding weights (weight-only; 16 = unquantized)")
    p.add_argument("--head-bits", type=int, choices=[4, 8, 16], default=4,
                   help="LM head weights (weight-only, GPTQ on its inputs in GPTQ runs; 16 = unquantized)")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--calib-text", default="c4", help="exllamav2 text name (c4, wiki, ...) or a .txt path")
    p.add_argument("--device", default="cpu",
                   help="device of the per-layer GPTQ/RTN, one decoder layer at a time (cpu, cuda); the other "
                        "stages run on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--r4-block", type=int, default=None,
                   help="block size of the down_proj Hadamard (tensor parallel: intermediate/TP or smaller)")
    p.add_argument("--steps", type=int, default=None, help="ConQuR online updates")
    p.add_argument("--conqur", default=None, metavar="JSON",
                   help='ConQuR learner options as a JSON object, e.g. \'{"alternations": 1, "target": "grid"}\' '
                        "(fields of conqur_vllm.calibration.options.ConqurOptions)")


def _conqur_options(args):
    """ConqurOptions from ``--conqur`` JSON (and ``--steps``), or a one-line CalibrationError naming the fix."""
    from pydantic import ValidationError

    from conqur_vllm.calibration.options import ConqurOptions
    from conqur_vllm.calibration.pipeline import CalibrationError

    fix = 'pass a JSON object of ConqurOptions fields, e.g. --conqur \'{"alternations": 1}\''
    try:
        fields = json.loads(args.conqur) if args.conqur else {}
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"--conqur is not valid JSON ({exc.msg}); {fix}") from None
    if not isinstance(fields, dict):
        raise CalibrationError(f"--conqur must be a JSON object, got {type(fields).__name__}; {fix}")
    if args.steps is not None:
        fields["steps"] = args.steps
    try:
        return ConqurOptions(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "options"
        raise CalibrationError(f"--conqur {where}: {err['msg']}; {fix}") from None


def _options(args):
    """CalibrationOptions from the flags, or a one-line CalibrationError when they contradict each other."""
    from pydantic import ValidationError

    from conqur_vllm.calibration.pipeline import CalibrationError

    try:
        return _build_options(args)
    except ValidationError as exc:
        error = exc.errors()[0]
        msg = error["msg"].removeprefix("Value error, ").replace("weight_symmetric=True", "--weight-symmetric")
        if error["loc"]:  # a single field: name its flag
            msg = f"--{'-'.join(str(part) for part in error['loc']).replace('_', '-')}: {msg}"
        raise CalibrationError(msg) from None


def _build_options(args):
    from conqur_vllm.calibration.options import CalibrationOptions

    conqur = _conqur_options(args)
    given = {name: value for name, value in (("a_clip", args.a_clip), ("kv_clip", args.kv_clip),
                                             ("gptq_inputs", args.gptq_inputs), ("gptq_damp", args.gptq_damp),
                                             ("gptq_residual_target", args.gptq_residual_target),
                                             ("weight_symmetric", args.weight_symmetric),
                                             ("smooth", args.smooth), ("layer_clips", args.layer_clips))
             if value is not None}
    return CalibrationOptions(**given,
        method=args.method, w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits, a_shift=args.a_shift,
        a_symmetric=args.a_symmetric, kv_shift=args.kv_shift,
        weight_quantizer=args.weight_quantizer, group_size=args.group_size, samples=args.samples,
        embed_bits=args.embed_bits, head_bits=args.head_bits,
        seq_len=args.seq_len, calib_text=args.calib_text, device=args.device, seed=args.seed,
        r4_block=args.r4_block, conqur=conqur)


def cmd_calibrate(args) -> None:
    from conqur_vllm.calibration.run import calibrate

    calibrate(args.model_dir, args.output, _options(args), resume=args.resume, metrics_port=args.metrics_port)


def cmd_eval(args) -> None:
    from conqur_vllm.eval.report import evaluate_path

    result = evaluate_path(args.model, seq_len=args.seq_len, windows=args.windows, tasks=args.tasks,
                           limit=args.limit)
    print(json.dumps(result, indent=2))


def cmd_serve(args, passthrough: list[str]) -> None:
    from conqur_vllm.serving import serve

    serve(args.checkpoint, host=args.host, port=args.port, vllm_args=passthrough)


def cmd_demo(args) -> None:
    from conqur_vllm.demo import run_demo

    run_demo(out_dir=args.output, serve=not args.no_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conqur", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("calibrate", help="learn rotations, quantize weights, write a W4A4 checkpoint")
    p.add_argument("model_dir", nargs="?", default=None, help="HF model folder (default: embedded SmolLM2-135M)")
    p.add_argument("-o", "--output", default=DEFAULT_OUT)
    _add_calibration_flags(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run with the same options")
    p.add_argument("--metrics-port", type=int, default=None, help="serve live progress for Prometheus")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("eval", help="perplexity (and zero-shot) of a model folder or conqur checkpoint")
    p.add_argument("model")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--tasks", default="", help="comma-separated zero-shot tasks (piqa,arc_easy,...)")
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="serve a checkpoint with vLLM's OpenAI server (extra flags go to vLLM)")
    p.add_argument("checkpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="calibrate the embedded SmolLM2, compare perplexities, serve and ask it")
    p.add_argument("-o", "--output", default=DEFAULT_OUT)
    p.add_argument("--no-serve", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from conqur_vllm.errors import USER_ERRORS

    try:
        if args.command == "serve":
            args.func(args, rest)
        else:
            args.func(args)
    except USER_ERRORS as exc:
        print(f"conqur {args.command}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"conqur {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
