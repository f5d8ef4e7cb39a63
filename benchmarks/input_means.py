"""Share of each decoder-linear input's energy that lies in its mean over tokens (|mu|^2 / mean |x|^2).

QuaRot-rotated model (randomized Hadamard R1-R4, seed ``--seed``; an R1 rotation does not change the share), the
calibration sequences ``a_shift`` measures on; per input kind the min, median and max over the layers.

    .venv/bin/python benchmarks/input_means.py --seed 0
"""

from __future__ import annotations

import argparse
import statistics

from conqur_vllm import assets
from conqur_vllm.calibration import pipeline
from conqur_vllm.calibration.act_shift import measure_input_shifts
from conqur_vllm.calibration.options import CalibrationOptions
from conqur_vllm.models.adapters import get_adapter
from conqur_vllm.rotation.rotations import apply_rotations

KINDS = {"q/k/v": "q_proj", "o_proj": "o_proj", "gate/up": "gate_proj", "down_proj (after R4)": "down_proj"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model, tokenizer = pipeline.load_model(assets.smollm2_dir())
    adapter = get_adapter(model.config)
    opts = CalibrationOptions(method="quarot", seed=args.seed)
    apply_rotations(model, adapter, pipeline.initial_rotations(model, opts))
    batches = pipeline.calibration_batches(tokenizer, assets.calibration_text(), opts.samples, opts.seq_len,
                                           opts.conqur.batch_size, args.seed)
    ids = batches[0][:pipeline.SHIFT_SEQUENCES]
    share = measure_input_shifts(model, adapter, ids, groups=("qkv", "o_proj", "gate_up", "down_proj")).energy_share
    print(f"{'input':<22} {'min':>7} {'median':>7} {'max':>7}")
    for kind, leaf in KINDS.items():
        v = [x for name, x in share.items() if name.endswith(leaf)]
        print(f"{kind:<22} {min(v):7.3f} {statistics.median(v):7.3f} {max(v):7.3f}")


if __name__ == "__main__":
    main()
