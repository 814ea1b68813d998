"""`edgedistill distill`: teacher gate -> synthetic data -> validation -> student -> evaluation.

Read top to bottom; each step writes its output under the run folder before the next starts:

    OUT/cache/teacher.sqlite   every teacher/generator response (a rerun pays for nothing twice)
    OUT/gate.json              the teacher's score on the held-out test set
    OUT/data/                  raw.jsonl, train.jsonl, calibration.jsonl (held out of training), rejects.jsonl,
                               report.json, manifest.json
    OUT/student/               merged HF checkpoint, manifest.json, README.md (model card)
    OUT/eval/                  eval.json, eval.md
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from edgedistill.distill.cache import ResponseCache
from edgedistill.distill.calibration_split import CALIBRATION_FILE, calibration_record, split_calibration
from edgedistill.distill.evaluate import add_agreement, add_vs_teacher, answer_requests, decoded_as, table_markdown
from edgedistill.distill.generate import attach_labels, generation_requests, label_requests, synthetic_inputs
from edgedistill.distill.teacher import ChatRequest, Teacher, make_teacher
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgedistill.errors import GateFailed
from edgedistill.intervals import fmt_ci
from edgedistill.manifest import read_manifest, sha256_file, sha256_json, write_json_atomic, write_manifest
from edgedistill.spec import TaskSpec, load_spec

console = Console(stderr=True)


def run_distill(spec_path: Path, out: Path | None = None, *, skip_gate: bool = False, gate_only: bool = False) -> dict[str, Any]:
    spec = load_spec(spec_path)
    out = Path(out or Path("runs") / spec.name)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    seeds, test = spec.load_seeds(), spec.load_test_set()
    cache = ResponseCache(out / "cache" / "teacher.sqlite")
    teacher = make_teacher(spec.teacher, spec.base_dir, cache)
    console.print(f"[bold]{spec.name}[/]: {len(seeds)} seeds, {len(test)} test rows, teacher {teacher.model_id}, run folder {out}")

    t = time.time()
    gate = teacher_gate(spec, teacher, test, out, skip_gate)
    timings["gate_s"] = time.time() - t
    if gate_only:
        return {"gate": gate}

    t = time.time()
    data_dir = out / "data"
    kept, report = build_dataset(spec, teacher, seeds, test, cache, data_dir)
    timings["data_s"] = time.time() - t

    t = time.time()
    student_dir, base_dir, train_info = train_student(spec, kept, data_dir, teacher, out)
    timings["train_s"] = time.time() - t

    t = time.time()
    results = evaluate_all(spec, teacher, test, student_dir, base_dir, out)
    timings["eval_s"] = time.time() - t

    write_model_card(spec, teacher, student_dir, report, train_info, results)
    summary = {"gate": gate, "data": report, "train": train_info, "eval": results, "timings_s": timings, "teacher_usage": teacher.usage.as_dict()}
    write_json_atomic(out / "distill.json", summary)
    console.print(f"done: student in {student_dir}, evaluation in {out / 'eval' / 'eval.md'}")
    return summary


# --- progress ----------------------------------------------------------------------------------


def run_with_progress(model: Teacher, reqs: list[ChatRequest], what: str) -> list:
    """Run requests with a progress bar showing done/total, cache hits, tokens and dollars."""
    if not reqs:
        return []
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[stats]}"), console=console
    ) as bar:
        task = bar.add_task(what, total=len(reqs), stats="")
        u = model.usage

        def tick(_res) -> None:
            bar.update(
                task, advance=1, stats=f"cached {u.cache_hits}  tokens {u.prompt_tokens + u.completion_tokens:,}  ${u.cost_usd:.4f}"
            )

        return model.run_chat_many(reqs, on_result=tick)


# --- 1. teacher gate ---------------------------------------------------------------------------


def teacher_gate(spec: TaskSpec, teacher: Teacher, test: list, out: Path, skip_gate: bool) -> dict[str, Any]:
    rows = spec.task.stratified(test, spec.teacher.gate.max_examples)
    reqs = answer_requests(spec.task, [r.input for r in rows], spec.task.teacher_messages)
    answers = run_with_progress(teacher, reqs, "teacher gate")
    # an answer cut off by the output budget is invalid (truncated), not parsed
    _, scores = spec.task.score_answers([r.output for r in rows], [a.text for a in answers], [a.finish_reason for a in answers])
    metric = spec.task.metric
    gate = {"metric": metric, "score": scores[metric], "score_ci": scores[f"{metric}_ci"], "n": scores["n"],
            "min_score": spec.teacher.gate.min_score, "scores": scores,
            "decoded_as": decoded_as(teacher, reqs), "teacher": teacher.describe()}
    gate["passed"] = scores[metric] >= spec.teacher.gate.min_score
    write_json_atomic(out / "gate.json", gate)
    lo, hi = scores[f"{metric}_ci"]
    line = f"teacher gate: {metric} {scores[metric]:.3f} (95 % {lo:.2f}–{hi:.2f}) on {len(rows)} test rows (min {spec.teacher.gate.min_score})"
    if not gate["passed"]:
        if not skip_gate:
            raise GateFailed(
                f"{line}: too low to teach; improve the teacher, lower teacher.gate.min_score in the spec, or pass --skip-gate"
            )
        console.print(f"[yellow]{line}: below the threshold, continuing because of --skip-gate[/]")
    else:
        console.print(f"[green]{line}: passed[/]")
    return gate


# --- 2. data -----------------------------------------------------------------------------------


def build_dataset(spec: TaskSpec, teacher: Teacher, seeds: list, test: list, cache: ResponseCache, data_dir: Path) -> tuple[list[dict], dict]:
    from edgedistill.distill.validate import format_report_table, validate_rows

    generator = make_teacher(spec.generation.generator, spec.base_dir, cache) if spec.generation.generator else teacher
    gen_reqs = generation_requests(spec, seeds)
    gen_results = run_with_progress(generator, [r for r, _ in gen_reqs], f"writing inputs ({generator.model_id})")
    synthetic = synthetic_inputs(spec, gen_reqs, gen_results, generator.model_id)
    pool = [{"id": f"pool-{i}", "input": x, "source": "pool", "provenance": {}} for i, x in enumerate(spec.load_pool())]

    to_label = pool + synthetic
    reqs = label_requests(spec, to_label)
    attach_labels(spec, to_label, reqs, run_with_progress(teacher, reqs, f"labelling ({teacher.model_id})"), teacher)
    if spec.validation.self_consistency:
        reqs2 = label_requests(spec, to_label, sample=1, temperature=spec.validation.self_consistency_temperature)
        attach_labels(spec, to_label, reqs2, run_with_progress(teacher, reqs2, "self-consistency"), teacher, key="consistency_output")

    seed_rows = [
        {"id": f"seed-{i}", "input": s.input, "output": s.output, "raw_output": spec.task.format_answer(s.output), "source": "seed", "provenance": {}}
        for i, s in enumerate(seeds)
    ]
    rows = seed_rows + to_label
    validated, rejected, report = validate_rows(spec, rows, [r.input for r in test])
    kept, held_out = split_calibration(spec.calibration, validated, stratify=spec.type == "classification")
    report["calibration_rows"] = len(held_out)
    report["calibration_sources"] = dict(sorted(Counter(str(r.get("source")) for r in held_out).items()))
    report["train_rows"] = len(kept)
    report["teacher_usage"] = teacher.usage.as_dict()
    if generator is not teacher:
        report["generator_usage"] = generator.usage.as_dict()

    data_dir.mkdir(parents=True, exist_ok=True)
    parts = [("raw.jsonl", rows), ("train.jsonl", kept), ("rejects.jsonl", rejected), (CALIBRATION_FILE, [calibration_record(r) for r in held_out])]
    for name, part in parts:
        _write_jsonl(data_dir / name, part)
    write_json_atomic(data_dir / "report.json", report)
    write_manifest(
        data_dir,
        kind="dataset",
        format="jsonl",
        stage="distill/data",
        inputs={"spec": sha256_json(_data_settings(spec)), "test_set": sha256_json([r.input for r in test])},
        settings={"generation": spec.generation.model_dump(mode="json"), "validation": spec.validation.model_dump(mode="json")},
        task=spec.spec_dict(),
        task_dir=str(spec.base_dir),
        data_hash=sha256_file(data_dir / "train.jsonl"),
        calibration={"path": CALIBRATION_FILE, "rows": len(held_out), "sha256": sha256_file(data_dir / CALIBRATION_FILE),
                     "settings": spec.calibration.model_dump(mode="json")},
        teacher=teacher.describe(),
        generator=generator.describe(),
    )
    console.print(format_report_table(report))
    sources = ", ".join(f"{k} {v}" for k, v in report["calibration_sources"].items())
    console.print(f"calibration split: {len(held_out)} of {len(validated)} validated rows held out of training ({sources}; {data_dir / CALIBRATION_FILE})")
    return kept, report


def _data_settings(spec: TaskSpec) -> dict:
    return spec.model_dump(mode="json", include={"name", "type", "instructions", "labels", "output_schema", "tools", "tool_choice", "seeds", "pool", "teacher", "generation", "validation",
                                     "calibration"})


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


# --- 3. student --------------------------------------------------------------------------------


def train_student(
    spec: TaskSpec, kept: list[dict], data_dir: Path, teacher: Teacher, out: Path, *, continue_from: Path | None = None
) -> tuple[Path, Path, dict]:
    """Train ``out/student`` on the kept rows, from the spec's student (or its init from the
    teacher's layers), or with ``continue_from`` from that trained student (``edgedistill retrain``)."""
    from edgedistill.distill.models import count_params, ensure_hf_checkpoint, init_from_layers
    from edgedistill.distill.train import train

    work = out / "work"
    teacher_dir = None
    if spec.teacher.kind == "local":
        teacher_dir = ensure_hf_checkpoint(spec.resolve(spec.teacher.path), work / "teacher_hf")
    base_id: dict[str, Any] = {"student": spec.student.model_dump(mode="json"), "teacher": spec.teacher.path if spec.teacher.kind == "local" else None}
    if continue_from is not None:
        base_dir = Path(continue_from)
        base_id = {"continue_from": sha256_json(read_manifest(base_dir, verify=True)["files"])}
    elif spec.student.init_from_teacher_layers is not None:
        # keyed by the layer choice, so changing it builds a new init instead of reusing a stale one
        base_dir = work / ("student_init-" + "-".join(map(str, spec.student.init_from_teacher_layers)))
        if not (base_dir / "config.json").exists():
            init_from_layers(teacher_dir, spec.student.init_from_teacher_layers, base_dir)
    else:
        base_dir = ensure_hf_checkpoint(spec.resolve(spec.student.path), work / "student_base")

    data_hash = sha256_file(data_dir / "train.jsonl")
    inputs = {"data": data_hash, "base": sha256_json(base_id), "training": sha256_json(spec.training.model_dump(mode="json"))}
    student_dir = out / "student"
    if (student_dir / "manifest.json").exists():
        old = read_manifest(student_dir)
        if old.get("inputs") == inputs:
            console.print("student: inputs unchanged, reusing the trained checkpoint")
            return student_dir, base_dir, old.get("training_result", {})

    kd = spec.training.logit_kd
    soft = kd.enabled and kd.source == "api_logprobs"
    examples = [
        {"messages": spec.task.student_messages(r["input"]), "answer": spec.task.format_answer(r["output"])}
        | ({"soft_labels": r["soft_labels"]} if soft and r.get("soft_labels") else {})
        for r in kept
    ]
    use_kd = kd.enabled and kd.source == "local"
    console.print(
        f"training student ({spec.training.method}, {len(examples)} rows, {spec.training.epochs:g} epochs"
        + (f", logit KD T={kd.temperature} alpha={kd.alpha}" if use_kd else "")
        + (f", label KD from the API's logprobs T={kd.temperature} alpha={kd.alpha} ({sum('soft_labels' in e for e in examples)} rows with soft labels)" if soft else "")
        + ")"
    )

    def log(entry: dict) -> None:
        if "warning" in entry:
            console.print(f"[yellow]warning:[/] {entry['warning']}")
        if "loss" in entry:
            console.print(f"  step {entry.get('step', '?')}: " + "  ".join(f"{k} {v:.4f}" for k, v in entry.items() if isinstance(v, float)))

    result = train(base_dir, student_dir, examples, spec.training, teacher_dir=teacher_dir if use_kd else None, log=log)
    result["params"] = count_params(student_dir)
    write_manifest(
        student_dir,
        kind="checkpoint",
        format="hf",
        stage="distill/train",
        inputs=inputs,
        settings={"training": spec.training.model_dump(mode="json"), "student": spec.student.model_dump(mode="json")},
        task=spec.spec_dict(),
        task_dir=str(spec.base_dir),
        data_hash=data_hash,
        teacher=teacher.describe(),
        training_result={k: v for k, v in result.items() if k != "losses"},
        **({"continued_from": str(base_dir)} if continue_from is not None else {}),
    )
    return student_dir, base_dir, result


# --- 4. evaluation -----------------------------------------------------------------------------


def evaluate_all(spec: TaskSpec, teacher: Teacher, test: list, student_dir: Path, base_dir: Path, out: Path) -> dict[str, dict]:
    from edgedistill.distill.models import count_params
    from edgedistill.distill.teacher_local import LocalHFTeacher

    inputs, golds = [r.input for r in test], [r.output for r in test]
    results: dict[str, dict] = {}
    t_reqs = answer_requests(spec.task, inputs, spec.task.teacher_messages)
    t_answers = run_with_progress(teacher, t_reqs, "eval: teacher")
    t_preds, results["teacher"] = spec.task.score_answers(golds, [a.text for a in t_answers], [a.finish_reason for a in t_answers])
    results["teacher"]["decoded_as"] = decoded_as(teacher, t_reqs)
    teacher_path = spec.resolve(spec.teacher.path) if spec.teacher.kind == "local" else None
    if teacher_path is not None and (teacher_path / "config.json").exists():
        results["teacher"]["params"] = count_params(teacher_path)
    for name, path in (("student", student_dir), ("undistilled student", base_dir)):
        model = LocalHFTeacher(path, cache=None, batch_size=spec.teacher.batch_size)
        reqs = answer_requests(spec.task, inputs, spec.task.student_messages)
        raw = [r.text for r in run_with_progress(model, reqs, f"eval: {name}")]
        preds, results[name] = spec.task.score_answers(golds, raw)
        results[name]["decoded_as"] = decoded_as(model, reqs)  # the task's constraint, as serve decodes
        add_agreement(results[name], preds, t_preds)
        add_vs_teacher(spec.task, results[name], golds, preds, t_preds)
        results[name]["params"] = count_params(path)
    eval_dir = out / "eval"
    write_json_atomic(eval_dir / "eval.json", {"task": spec.name, "test_rows": len(test), "results": results})
    table = table_markdown(spec, results)
    (eval_dir / "eval.md").write_text(f"# {spec.name}: held-out test set ({len(test)} rows)\n\n{table}", encoding="utf-8")
    console.print(table)
    return results


def teacher_version(spec: TaskSpec) -> str:
    """What pins the teacher: the weights' hash for a local model, the API's model name otherwise."""
    if spec.teacher.kind != "local":
        return f"{spec.teacher.model} at {spec.teacher.base_url}"
    path = spec.resolve(spec.teacher.path)
    weights = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    return "sha256 " + ", ".join(sha256_file(w)[:16] for w in weights) if weights else "unknown"


def write_model_card(spec: TaskSpec, teacher: Teacher, student_dir: Path, report: dict, train_info: dict, results: dict) -> None:
    s = results["student"]
    metric = spec.task.metric
    card = f"""---
library_name: transformers
tags: [edgedistill, distillation, {spec.type}]
---
# {spec.name} student

Distilled by edgedistill from **{teacher.model_id}** ({json.dumps(teacher.describe())}), version {teacher_version(spec)}.

- Task: {spec.type}; instructions: {spec.instructions.strip()!r}
- Labels: {", ".join(spec.labels) if spec.labels else "-"}
- Teacher decoding for labels: temperature 0, max_tokens {spec.task.output_budget} (the task's output budget)
- Input generation: {spec.generation.num_inputs} inputs, strategies {", ".join(spec.generation.strategies)}, temperature {spec.generation.temperature}, top_p {spec.generation.top_p}, seed {spec.generation.seed}
- Training data: {report.get("train_rows", report["kept"])} rows trained on, of {report["kept"]} kept of {report["total"]} (rejected: {json.dumps(report["rejected"])}; {report.get("calibration_rows", 0)} held out as the calibration split); data hash in manifest.json
- Filters: {json.dumps(spec.validation.model_dump(mode="json"))}
- Hyperparameters: {json.dumps(spec.training.model_dump(mode="json"))}
- Student init: {json.dumps(spec.student.model_dump(mode="json"))}; {train_info.get("params", s.get("params", 0)) / 1e6:.1f}M parameters

## Held-out evaluation ({s["n"]} rows)

{table_markdown(spec, results)}
Student {metric}: {fmt_ci(s[metric], s.get(f"{metric}_ci"))} on {s["n"]} rows; agreement with the teacher: {s.get("agreement_with_teacher", 0):.3f}.
"""
    (student_dir / "README.md").write_text(card, encoding="utf-8")
    # the card is written after training's manifest: record its hash there (a retrain into the same
    # folder would otherwise leave the previous card's hash, and the next stage refuse the student)
    manifest = read_manifest(student_dir)
    manifest["files"]["README.md"] = sha256_file(student_dir / "README.md")
    write_json_atomic(student_dir / "manifest.json", manifest)
