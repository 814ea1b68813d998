"""`edgedistill compress`: a student checkpoint -> one artifact folder per format, each measured.

Read top to bottom:
  1. the inputs: checkpoint (hash-verified), task spec (test set), calibration rows (task data)
  2. the FP student's reference numbers (accuracy, greedy tokens, speed), cached in ``reference.json``
  3. per format: build (skipped when the manifest says the same inputs and settings made it),
     open it with its own runtime, measure, calibrate its confidence and thresholds on the
     calibration split (``compress.calibrate``), gate (allowed accuracy drop from the spec)

Accuracy (reference and artifacts) is measured with the answers decoded under the task's constraint
(one of the labels; the JSON schema), built once on the source tokenizer: what serve delivers.
``"constrained": true`` beside the scores in the manifests, ``reference.json`` and ``compress.json``
says so.
  4. the summary table (``compress.json``, ``compress.md``), and a non-zero exit on a failed gate

Layout of OUT (default: ``<checkpoint>/../artifacts``)::

    OUT/<family>-<variant>/   the artifact + manifest.json (format, bits, method, size, hashes,
                              tool versions, task spec, quality, gate)
    OUT/rejected/<name>/      artifacts that failed the gate (kept, never silently served)
    OUT/work/                 shared intermediates (F16 GGUF, FP32 ONNX) and tool logs
    OUT/reference.json        the FP student's numbers
    OUT/compress.json, compress.md
"""

from __future__ import annotations

import inspect
import json
import shutil
import time
from pathlib import Path
from typing import Any

from edgedistill.compress.calibrate import calibrate, calibration_cells, calibration_note, calibration_split, summary_of
from edgedistill.compress.calibration import MIN_CHOICE_ROWS, input_key, load_calibration, prompt_ids
from edgedistill.compress.evaluate import choice_scorer, measure, task_constraint
from edgedistill.compress.formats import Built, FormatSpec, parse_formats
from edgedistill.runtimes.registry import builder
from rich.console import Console
from rich.table import Table

from edgedistill.datafiles import read_rows
from edgedistill.errors import UserError
from edgedistill.intervals import ALPHA, fmt_ci, fmt_p
from edgedistill.manifest import MANIFEST, hash_files, read_manifest, sha256_json, write_json_atomic, write_manifest
from edgedistill.spec import TaskSpec, load_spec, spec_from_manifest

# what a build that chooses between candidates scores them on (``Calibration.choice_rows``); run's stage key holds it
BUILD_CHOICE = "task metric on up to 100 distillation rows outside the quantizers' sample and the calibration split"
console = Console(stderr=True)
AGREE_TOKENS = 16


class CompressGateFailed(UserError):
    """An artifact lost more accuracy than the spec allows."""

    exit_code = 3


def type_metrics_of(task: Any, scores: dict[str, Any]) -> dict[str, Any]:
    """Every metric of the task's type with its interval (``slot_f1``, ``slot_f1_ci``, ``exact_match``, ...)."""
    return {k: scores[k] for m in task.metrics for k in (m, f"{m}_ci") if k in scores}


def gate_passes(reference: float, value: float, max_drop: float) -> bool:
    """The quality gate's rule: ``value`` (the candidate's primary metric, point estimate) is at most
    ``max_drop`` below ``reference``'s on the same test rows. The paired test beside it is reported;
    it does not decide."""
    return reference - value <= max_drop + 1e-9


def passed_artifacts(summary: dict[str, Any] | Path) -> list[dict[str, Any]]:
    """The artifacts that passed the quality gate, from ``run_compress``'s summary or the folder it
    wrote (``compress.json``): what serve and bench take next. Each row has name, format, path, bits."""
    if isinstance(summary, Path):
        path = summary / "compress.json"
        if not path.exists():
            raise UserError(f"{path} is missing; run `edgedistill compress` first")
        summary = json.loads(path.read_text())
    return [row for row in summary["artifacts"] if row.get("passed")]


def run_compress(
    checkpoint: Path,
    *,
    formats: str | None = None,
    calibration: Path | None = None,
    task: Path | None = None,
    out: Path | None = None,
    max_drop: float | None = None,
    keep_failed: bool = False,
    eval_limit: int | None = None,
    strict: bool = True,
    model: str = "student",
) -> dict[str, Any]:
    """strict=False (``edgedistill run``): a failed format or gate is reported loudly but does not
    stop the run; the artifacts that passed go on to serve and bench. ``model``: what the checkpoint
    is, as the tables name its full-precision row ("student", or "teacher" for run's baseline)."""
    # --- 1. inputs ---------------------------------------------------------------------------
    ckpt = Path(checkpoint)
    if not (ckpt / "config.json").exists():
        raise UserError(f"{ckpt} is not an HF checkpoint folder (no config.json); pass the student folder made by `edgedistill distill`")
    ck_manifest = read_manifest(ckpt, verify=True) if (ckpt / MANIFEST).exists() else {}
    spec = load_spec(task) if task else spec_from_manifest(ck_manifest, ckpt)
    fmts = parse_formats(formats or spec.compress.formats)
    max_drop = spec.compress.max_accuracy_drop if max_drop is None else max_drop
    out = Path(out or ckpt.parent / "artifacts")
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    if calibration is None:
        calibration = ckpt.parent / "data"
        if not calibration.exists():
            raise UserError(f"no --calibration given and {calibration} does not exist; pass the distill run's data/ folder or a JSONL")
    calib = load_calibration(calibration, spec.compress.calibration_samples)
    source_hash = sha256_json(ck_manifest.get("files") or hash_files(ckpt))

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    calib_texts = calib.texts(spec, tokenizer)
    test = spec.load_test_set()
    if eval_limit:
        test = spec.task.stratified(test, eval_limit)
    test_prompts = [prompt_ids(tokenizer, spec.task.student_messages(r.input)) for r in test]
    golds = [r.output for r in test]
    agree_prompts = calib.prompts(spec, tokenizer, spec.compress.agreement_prompts)
    split, test_rows = calibration_split(calibration, ckpt), [{"input": r.input, "output": r.output} for r in test]
    constraint = task_constraint(spec.task, tokenizer, _logits_width(ckpt, tokenizer))
    held = read_rows(split, "the calibration split", ["input", "output"], None) if split.is_file() else []
    choice = calib.choice_rows(exclude={input_key(r["input"]) for r in held})
    scorer = choice_scorer(spec, tokenizer, choice, constraint)  # for builds that choose between candidates
    if not choice and any(f.family == "gguf" for f in fmts):
        console.print(f"[yellow]fewer than {MIN_CHOICE_ROWS} distillation rows outside the quantizers' sample: GGUF keeps the "
                      "importance matrix without comparing (lower compress.calibration_samples for a choice)[/]")  # fmt: skip
    console.print(
        f"[bold]compress[/] {ckpt} -> {out}: {', '.join(map(str, fmts))}; {len(calib.rows)} calibration rows from {calib.path}, "
        f"{len(test)} test rows, max drop {max_drop:g}"
    )

    # --- 2. the FP reference -------------------------------------------------------------------
    ref_key = sha256_json({"checkpoint": source_hash, "test": [[p, g] for p, g in zip(test_prompts, golds, strict=True)],
                           "agree": agree_prompts, "agree_len": AGREE_TOKENS, "constrained": constraint is not None})
    ref = _reference(ckpt, tokenizer, spec, test_prompts, golds, agree_prompts, out / "reference.json", ref_key, constraint, model)
    metric = spec.task.metric
    fp_score = ref["scores"][metric]
    fp_mb = _size_mb(ckpt, weights_only=True)
    console.print(f"FP {model}: {metric} {fp_score:.3f}, {fp_mb:.1f} MB of weights, {ref['tokens_per_s']:.0f} tokens/s")

    # --- 3. each format --------------------------------------------------------------------------
    rows: list[dict[str, Any]] = []
    for fmt in fmts:
        t0 = time.time()
        try:
            folder, manifest, reused = _build(fmt, ckpt, out, work, spec, calib_texts, calib, source_hash, ck_manifest, scorer, choice)
            quality = manifest.get("quality")
            if not (reused and quality and quality.get("reference") == ref_key and (quality.get("drop_test") or {}).get("metric") == metric):
                quality = _measure(fmt, folder, manifest, tokenizer, spec, test_prompts, golds, agree_prompts, ref, ref_key, constraint)
            cal = calibrate(folder, manifest, split, test_rows, work / "calibration", console)
            if cal is not None:
                manifest["calibration"] = cal
            drop = fp_score - quality["scores"][metric]
            passed = gate_passes(fp_score, quality["scores"][metric], max_drop)
            paired = quality["drop_test"]
            manifest["quality"] = quality
            manifest["gate"] = {"metric": metric, "fp": fp_score, "value": quality["scores"][metric], "drop": round(drop, 4),
                                "drop_ci": paired["diff_ci"], "drop_p_value": paired["p_value"],
                                "max_drop": max_drop, "constrained": constraint is not None, "passed": passed}
            write_json_atomic(folder / MANIFEST, manifest)
            row = {"name": fmt.name, "format": fmt.family, "variant": fmt.variant, "bits": fmt.bits, "path": str(folder),
                   "size_mb": manifest["size_mb"], "size_vs_fp": round(manifest["size_mb"] / fp_mb, 3) if fp_mb else None,
                   metric: quality["scores"][metric], f"{metric}_ci": quality["scores"].get(f"{metric}_ci"), "n": quality["scores"].get("n"),
                   "constrained": quality.get("constrained", False), "drop": round(drop, 4), "drop_ci": paired["diff_ci"],
                   "drop_p_value": paired["p_value"], "drop_test": paired["test"], "token_agreement": quality.get("token_agreement"),
                   "tokens_per_s": quality["tokens_per_s"], "method": manifest["method"], "passed": passed,
                   "reused": reused, "seconds": round(time.time() - t0, 1),
                   **type_metrics_of(spec.task, quality["scores"]), **summary_of(cal)}
            if not passed and not keep_failed:
                row["path"] = str(_reject(folder, out))
        except UserError as e:
            console.print(f"[red]{fmt}: {e}[/]")
            row = {"name": fmt.name, "format": fmt.family, "variant": fmt.variant, "bits": fmt.bits, "error": str(e), "passed": False}
        rows.append(row)
        _print_row(row, metric)

    # --- 4. summary ----------------------------------------------------------------------------
    summary = {"checkpoint": str(ckpt), "model": model, "task": spec.name, "metric": metric, "max_drop": max_drop, "constrained": constraint is not None,
               "fp": {"size_mb": round(fp_mb, 1), metric: fp_score, f"{metric}_ci": ref["scores"].get(f"{metric}_ci"),
                      "n": ref["scores"].get("n"), "tokens_per_s": ref["tokens_per_s"]},
               "calibration": {"path": str(calib.path), "rows": len(calib.rows), "hash": calib.data_hash},
               "test_rows": len(test), "artifacts": rows}
    write_json_atomic(out / "compress.json", summary)
    md = summary_markdown(summary)
    (out / "compress.md").write_text(md, encoding="utf-8")
    console.print(_table(summary))
    failed = [r for r in rows if not r["passed"]]
    errors = [r for r in failed if "error" in r]
    if errors and strict:
        raise UserError(f"{len(errors)} format(s) could not be built: {', '.join(r['name'] for r in errors)} (see messages above)")
    gate_failed = [r for r in failed if "error" not in r]
    if gate_failed and not keep_failed and strict:
        names = ", ".join(f"{r['name']} (-{r['drop']:.3f})" for r in gate_failed)
        raise CompressGateFailed(
            f"QUALITY GATE FAILED: {names} lost more than {max_drop:g} {metric} vs the FP {model}; "
            f"moved to {out / 'rejected'}; rerun with --keep-failed to keep them, or raise compress.max_accuracy_drop"
        )
    if errors:
        console.print(f"[bold red]warning:[/] {len(errors)} format(s) could not be built: {', '.join(r['name'] for r in errors)}")
    if gate_failed:
        where = "kept in place (--keep-failed)" if keep_failed else f"moved to {out / 'rejected'}, not served"
        console.print(f"[bold red]QUALITY GATE FAILED:[/] {', '.join(r['name'] for r in gate_failed)}: {where}")
    return summary


# --- reference -----------------------------------------------------------------------------------


def _logits_width(ckpt: Path, tokenizer: Any) -> int:
    """The student's vocabulary size (its logits rows may be wider than the tokenizer)."""
    try:
        size = int(json.loads((ckpt / "config.json").read_text(encoding="utf-8")).get("vocab_size") or 0)
    except (OSError, ValueError, TypeError):
        size = 0
    return max(size, len(tokenizer))


def _reference(ckpt, tokenizer, spec, test_prompts, golds, agree_prompts, path: Path, key: str, constraint=None,
               model: str = "student") -> dict[str, Any]:
    if path.exists():
        import json

        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("key") == key:
            if f"{spec.task.metric}_ci" not in old["scores"]:  # cached before the task had this metric (or intervals): score again
                old["scores"] = {**old["scores"], **spec.task.scores(golds, old["preds"])}
            return old
    from edgedistill.runtimes.hf import HFRuntime

    console.print(f"measuring the FP {model} (transformers) ...")
    rt = HFRuntime(ckpt)
    try:
        m = measure(rt, tokenizer, spec, test_prompts, golds, agree_prompts, None, None, AGREE_TOKENS, constraint)
    finally:
        rt.close()
    ref = {"key": key, "scores": m["scores"], "constrained": m["constrained"], "tokens_per_s": m["tokens_per_s"],
           "preds": m["_preds"], "tokens": m["_tokens"]}
    write_json_atomic(path, ref)
    return ref


# --- build ---------------------------------------------------------------------------------------


def prepare_tools(formats: str) -> None:
    """Fetch and install what building ``formats`` needs outside our environment (the converters'
    venvs, llama.cpp's sources); quick when they exist. Failures surface again, in one line, when
    compress builds."""
    for family in dict.fromkeys(f.family for f in parse_formats(formats)):
        prepare = getattr(builder(family), "prepare", None)
        if prepare is not None:
            prepare()


def _module(fmt: FormatSpec):
    """The format's module (``build``, ``load``; see ``compress.formats``), from the runtimes' registry."""
    return builder(fmt.family)


def _build(fmt, ckpt, out, work, spec: TaskSpec, calib_texts, calib, source_hash, ck_manifest, scorer=None, choice=None) -> tuple[Path, dict, bool]:
    folder = out / fmt.name
    inputs = {"checkpoint": source_hash, "calibration": calib.data_hash}
    settings = {"format": str(fmt), "calibration_samples": len(calib_texts)}
    key_fn = getattr(_module(fmt), "build_key", None)  # e.g. tool versions that change the bytes
    if key_fn is not None:
        settings["build"] = key_fn(fmt)
    extra = {}
    if scorer is not None and "score" in inspect.signature(_module(fmt).build).parameters:
        extra["score"] = scorer  # the build chooses between candidates on the choice rows (not the calibration split)
        inputs["chosen_on"] = sha256_json(choice)
    for candidate in (folder, out / "rejected" / fmt.name):
        if (candidate / MANIFEST).exists():
            try:
                old = read_manifest(candidate, verify=True)
            except UserError as e:
                console.print(f"{fmt.name}: existing artifact is damaged ({e}); rebuilding")
                continue
            if old.get("inputs") == inputs and old.get("settings", {}).get("request") == settings:
                if candidate != folder:
                    shutil.rmtree(folder, ignore_errors=True)
                    candidate.rename(folder)
                console.print(f"{fmt.name}: inputs and settings unchanged, reusing {folder}")
                return folder, old, True
    partial = out / f".{fmt.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    console.print(f"building {fmt} ...")
    t = time.time()
    built: Built = _module(fmt).build(ckpt, fmt, partial, calib_texts, work, **extra)
    build_s = time.time() - t
    manifest = write_manifest(
        partial,
        kind="artifact",
        format=fmt.family,
        stage="compress",
        inputs=inputs,
        settings={"request": settings, **built.settings},
        task=spec.spec_dict(),
        task_dir=str(spec.base_dir),
        name=f"{spec.name}-{fmt.name}",
        variant=fmt.variant,
        bits=fmt.bits,
        method=built.method,
        model_file=built.model_file,
        size_mb=round(_size_mb(partial), 2),
        source={"checkpoint": str(ckpt.resolve()), "hash": source_hash, "teacher": ck_manifest.get("teacher")},
        calibration_data={"path": str(calib.path), "rows": len(calib_texts), "hash": calib.data_hash},
        tools=built.tools,
        notes=built.notes,
        build_s=round(build_s, 1),
    )
    for stale in (folder, out / "rejected" / fmt.name):
        shutil.rmtree(stale, ignore_errors=True)
    partial.rename(folder)
    return folder, manifest, False


def _measure(fmt, folder, manifest, tokenizer, spec, test_prompts, golds, agree_prompts, ref, ref_key, constraint=None) -> dict[str, Any]:
    console.print(f"measuring {fmt.name} with {manifest.get('runtime') or fmt.family} runtime ...")
    rt = _module(fmt).load(folder, manifest)
    try:
        m = measure(rt, tokenizer, spec, test_prompts, golds, agree_prompts, ref["tokens"], ref["preds"], AGREE_TOKENS, constraint)
    finally:
        rt.close()
    return {"reference": ref_key, **{k: v for k, v in m.items() if not k.startswith("_")}}


def _reject(folder: Path, out: Path) -> Path:
    dest = out / "rejected" / folder.name
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder.rename(dest)
    return dest


def _size_mb(folder: Path, weights_only: bool = False) -> float:
    files = [p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST]
    if weights_only:
        files = [p for p in files if p.suffix in (".safetensors", ".bin", ".gguf", ".onnx", ".data")]
    return sum(p.stat().st_size for p in files) / 1e6


# --- tables --------------------------------------------------------------------------------------

COLUMNS = ("format", "bits", "MB", "size vs FP", "{metric}", "change vs FP", "token agreement", "tokens/s", "ECE test (before → after)",
           "threshold (99 %)", "gate")


def _cells(r: dict[str, Any], metric: str) -> list[str]:
    if "error" in r:
        return [r["name"], str(r["bits"]), "-", "-", "-", "-", "-", "-", "-", "-", "ERROR"]
    ci = r.get("drop_ci")
    change = fmt_ci(-r["drop"], [-ci[1], -ci[0]] if ci else None, sign="+") + (f", {fmt_p(r['drop_p_value'])}" if r.get("drop_p_value") is not None else "")
    return [r["name"], str(r["bits"]), f"{r['size_mb']:.1f}", f"{r['size_vs_fp']:.0%}" if r.get("size_vs_fp") else "-",
            fmt_ci(r[metric], r.get(f"{metric}_ci")), change,
            f"{r['token_agreement']:.3f}" if r.get("token_agreement") is not None else "-",
            f"{r['tokens_per_s']:.0f}", *calibration_cells(r), "pass" if r["passed"] else "FAIL"]


def noise_note(summary: dict[str, Any]) -> str:
    """One line: which artifacts' changes vs the FP student are within noise (p >= 0.05, paired test)."""
    rows = [r for r in summary["artifacts"] if r.get("drop_p_value") is not None]
    if not rows:
        return ""
    quiet = [r["name"] for r in rows if r["drop_p_value"] >= ALPHA]
    real = [r["name"] for r in rows if r["drop_p_value"] < ALPHA]
    said = (f"within noise: {', '.join(quiet)}" if quiet else "") + ("; " if quiet and real else "") + (f"a real change: {', '.join(real)}" if real else "")
    test = ", ".join(dict.fromkeys(str(r.get("drop_test", "paired test")).replace("_", " ") for r in rows))
    return (f"\nIn parentheses: 95 % intervals over {summary['test_rows']} rows; the change vs FP is a paired test on the same rows "
            f"({test}), {said} (p >= {ALPHA:g} is noise).\n")


def summary_markdown(summary: dict[str, Any]) -> str:
    metric = summary["metric"]
    cols = [c.format(metric=metric) for c in COLUMNS]
    fp = summary["fp"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
             (f"| FP {summary.get('model', 'student')} (transformers) | 32 | {fp['size_mb']:.1f} | 100% | {fmt_ci(fp[metric], fp.get(f'{metric}_ci'))} | - | 1.000 "
              f"| {fp['tokens_per_s']:.0f} | - | - | - |")]
    lines += ["| " + " | ".join(_cells(r, metric)) + " |" for r in summary["artifacts"]]
    shaped = ", answers decoded under the task's constraint as served" if summary.get("constrained") else ""
    return (f"# {summary['task']}: compressed artifacts ({summary['test_rows']} held-out rows{shaped}, max drop {summary['max_drop']:g})\n\n"
            + "\n".join(lines) + "\n" + noise_note(summary) + calibration_note(summary))


def _table(summary: dict[str, Any]) -> Table:
    metric = summary["metric"]
    model = summary.get("model", "student")
    t = Table(title=f"{summary['task']}: artifacts vs the FP {model} ({summary['test_rows']} held-out rows)")
    for c in COLUMNS:
        t.add_column(c.format(metric=metric))
    fp = summary["fp"]
    t.add_row(f"FP {model}", "32", f"{fp['size_mb']:.1f}", "100%", fmt_ci(fp[metric], fp.get(f"{metric}_ci")), "-", "1.000",
              f"{fp['tokens_per_s']:.0f}", "-", "-", "-")
    for r in summary["artifacts"]:
        cells = _cells(r, metric)
        style = "red" if not r["passed"] else None
        t.add_row(*cells, style=style)
    return t


def _print_row(row: dict[str, Any], metric: str) -> None:
    if "error" in row:
        return
    verdict = "[green]pass[/]" if row["passed"] else f"[bold red]FAIL (drop {row['drop']:.3f})[/]"
    console.print(f"  {row['name']}: {row['size_mb']:.1f} MB, {metric} {row[metric]:.3f}, "
                  f"token agreement {row['token_agreement']}, {row['tokens_per_s']:.0f} tokens/s, gate {verdict}")
