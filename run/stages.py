"""`edgedistill run task.yaml --out DIR`: teacher gate -> data -> student -> artifacts -> serve -> bench.

The orchestrator: the one layer above the stages, which calls each stage's own entry point.

Each stage is the same code as its own command, and talks to the next through artifacts on disk
(manifests) and HTTP. ``DIR/run.json`` records, per stage, the hash of its inputs and settings and
of what it produced. A stage whose record matches (and whose outputs still verify) is skipped; a
changed stage reruns, and so does everything after it (its inputs include the previous stage's
output hash). Inside a stage, work already paid for is kept too: the teacher's answers are cached
(SQLite), training resumes from its last checkpoint, unchanged artifacts are reused.

The serve+bench stage (``edgedistill.run.servers``) starts one ``edgedistill serve`` per artifact that
passed the quality gate (student only), one for the teacher, the cascade and the peer
``python -m llama_cpp.server`` on the same GGUF; then measures them all with bench and stops them.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from edgedistill.run.servers import serve_and_bench
from rich.console import Console

from edgedistill.errors import UserError
from edgedistill.manifest import MANIFEST, hash_files, read_manifest, sha256_file, sha256_json, write_json_atomic
from edgedistill.spec import TaskSpec, load_spec

console = Console(stderr=True)
STAGES = ("distill", "compress", "bench")


def _prepare_tools(formats: str, errors: list[str]) -> None:
    from edgedistill.compress.pipeline import prepare_tools

    try:
        prepare_tools(formats)
    except Exception as e:  # noqa: BLE001 -- compress retries the same step and reports it itself
        errors.append(str(e) or type(e).__name__)


def run_all(spec_path: Path, out: Path | None = None, *, skip_gate: bool = False, force: list[str] | None = None) -> dict[str, Any]:
    spec = load_spec(spec_path)
    out = Path(out or Path("runs") / spec.name)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "run.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"stages": {}}
    force = set(force or [])
    timings: dict[str, float] = {}
    rerun_rest = False

    def stage(name: str, inputs: dict[str, Any], check, do) -> Any:
        nonlocal rerun_rest
        key = sha256_json(inputs)
        rec = state["stages"].get(name)
        t = time.time()
        if not rerun_rest and name not in force and rec and rec.get("inputs") == key and rec.get("status") == "done":
            produced = _safe(check)
            if produced is not None and produced == rec.get("outputs"):
                console.print(f"[green]{name}[/]: inputs and settings unchanged, outputs verified -- skipped")
                timings[name] = 0.0
                return rec
        rerun_rest = True  # this stage reruns: so does every stage after it
        console.rule(f"[bold]{name}")
        state["stages"][name] = {"inputs": key, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json_atomic(state_path, state)
        do()
        seconds = round(time.time() - t, 1)
        state["stages"][name] = {"inputs": key, "status": "done", "outputs": check(), "seconds": seconds}
        write_json_atomic(state_path, state)
        timings[name] = seconds
        return state["stages"][name]

    student = out / "student"
    data = out / "data"
    artifacts = out / "artifacts"
    bench_dir = out / "bench"

    # 1. distill: gate, data, student, evaluation
    from edgedistill.distill.pipeline import run_distill

    prep: list[threading.Thread] = []
    prep_errors: list[str] = []

    def do_distill() -> None:
        # compress's converter venvs are installed by pip while distill runs (mostly downloads and
        # disk); compress waits for them (a lock) and reports any failure itself
        t = threading.Thread(target=_prepare_tools, args=(spec.compress.formats, prep_errors), daemon=True, name="prepare-tools")
        t.start()
        prep.append(t)
        run_distill(spec_path, out, skip_gate=skip_gate)

    stage("distill", _distill_inputs(spec), lambda: _outputs(student, data), do_distill)
    for t in prep:
        t.join()
    for e in prep_errors:
        console.print(f"[yellow]preparing compress's tools in the background failed ({e}); compress tries again")

    # 2. compress: every format, gated
    from edgedistill.compress.pipeline import BUILD_CHOICE, passed_artifacts, run_compress

    from edgedistill.thresholds import THRESHOLD_RULE

    passed: list[dict[str, Any]] = []
    teacher_fmt = quantized_teacher_format(spec)
    teacher_artifacts = out / "teacher_artifacts"

    def do_compress() -> None:
        passed[:] = passed_artifacts(run_compress(student, calibration=data, task=spec_path, out=artifacts, strict=False))
        if teacher_fmt:  # the baseline "why not just quantize the teacher?", built and gated by the same code
            console.print(f"[bold]baseline[/]: the teacher quantized to {teacher_fmt}")
            run_compress(spec.resolve(str(spec.teacher.path)), formats=teacher_fmt, calibration=data, task=spec_path,
                         out=teacher_artifacts, strict=False, model="teacher")  # fmt: skip

    def compress_outputs() -> dict[str, str]:
        outputs = _artifact_outputs(artifacts)
        if teacher_fmt:
            outputs.update({f"teacher/{k}": v for k, v in _artifact_outputs(teacher_artifacts, passed_only=False).items()})
        return outputs

    stage(
        "compress",
        {"student": state["stages"]["distill"]["outputs"], "compress": spec.compress.model_dump(mode="json"), "task": _task_core(spec),
         "quantized_teacher": teacher_fmt, "rules": {"threshold": THRESHOLD_RULE, "build_choice": BUILD_CHOICE}},
        compress_outputs,
        do_compress,
    )
    if not passed:  # compress was skipped: what it made before
        passed = passed_artifacts(artifacts)
    quantized_teacher = _built_artifacts(teacher_artifacts) if teacher_fmt else []

    # 3. serve + bench
    stage(
        "bench",
        {"artifacts": state["stages"]["compress"]["outputs"], "bench": spec.bench.model_dump(mode="json"), "task": _task_core(spec)},
        lambda: {"report": sha256_file(bench_dir / "report.json")} if (bench_dir / "report.json").exists() else None,
        lambda: serve_and_bench(spec, spec_path, out, passed, bench_dir, quantized_teacher=quantized_teacher),
    )

    report = write_report(spec, out, timings, state)
    console.print(f"[bold]done[/]: {out / 'report.md'} ({out / 'report.json'}, {out / 'pareto.png'})")
    return report


# --- what each stage depends on -----------------------------------------------------------------


def _task_core(spec: TaskSpec) -> dict[str, Any]:
    d = spec.spec_dict()
    d.pop("compress", None)
    d.pop("bench", None)
    return d


def _distill_inputs(spec: TaskSpec) -> dict[str, Any]:
    """The spec (without later stages' sections) and the content of every file it points at."""
    files: dict[str, str] = {}
    sources = [("seeds", spec.seeds), ("test_set", spec.test_set), ("pool", spec.pool)]
    for name, src in sources:
        if src is not None and not isinstance(src, list):
            files[name] = sha256_file(spec.resolve(src.path))
    for name, model in (("teacher", spec.teacher), ("generator", spec.generation.generator)):
        if model is not None and model.kind == "local" and model.path:
            files[name] = model_hash(spec.resolve(model.path))
    files["student"] = model_hash(spec.resolve(spec.student.path))
    return {"task": _task_core(spec), "files": files}


def model_hash(path: Path) -> str:
    """The content hash of a model file or folder (a folder we made: its manifest's file list)."""
    if path.is_file():
        return sha256_file(path)
    if (path / MANIFEST).exists():  # a folder we made: its manifest already lists its files' hashes
        return sha256_json(read_manifest(path).get("files"))
    if path.is_dir():
        return sha256_json(hash_files(path))
    raise UserError(f"model {path} does not exist; fix the spec's path (relative paths start at the spec's folder)")


def _outputs(*folders: Path) -> dict[str, str]:
    """Hashes of the manifests' file lists, after checking the files against them."""
    return {f.name: sha256_json(read_manifest(f, verify=True)["files"]) for f in folders}


def quantized_teacher_format(spec: TaskSpec) -> str | None:
    """The format the teacher is quantized to as the baseline (the student's 4-bit GGUF format among
    compress.formats, e.g. ``gguf:q4_k_m``), or None: the teacher is not a local HF checkpoint (an API,
    or already a GGUF file), or the student gets no 4-bit GGUF."""
    from edgedistill.compress.formats import parse_formats

    if spec.teacher.kind != "local" or not spec.resolve(str(spec.teacher.path)).is_dir():
        return None
    fmt = next((f for f in parse_formats(spec.compress.formats) if f.family == "gguf" and f.bits == 4), None)
    return f"{fmt.family}:{fmt.variant}" if fmt else None


def _built_artifacts(folder: Path) -> list[dict[str, Any]]:
    """compress.json's rows that were built (passed or not: a baseline is measured either way)."""
    path = folder / "compress.json"
    if not path.exists():
        return []
    return [r for r in json.loads(path.read_text())["artifacts"] if r.get("path") and not r.get("error")]


def _artifact_outputs(artifacts: Path, passed_only: bool = True) -> dict[str, str]:
    from edgedistill.compress.pipeline import passed_artifacts

    rows = passed_artifacts(artifacts) if passed_only else _built_artifacts(artifacts)
    return {row["name"]: sha256_json(read_manifest(Path(row["path"]), verify=True)["files"]) for row in rows}


def _safe(check) -> Any:
    try:
        return check()
    except (UserError, OSError, KeyError, json.JSONDecodeError):
        return None


# --- the summary --------------------------------------------------------------------------------


def write_report(spec: TaskSpec, out: Path, timings: dict[str, float], state: dict[str, Any]) -> dict[str, Any]:
    from edgedistill.run.report import build_report, report_markdown

    rep = build_report(spec, out, state)
    rep["timings_s"] = {name: state["stages"].get(name, {}).get("seconds") for name in STAGES}
    rep["this_run_s"] = timings
    write_json_atomic(out / "report.json", rep)
    (out / "report.md").write_text(report_markdown(rep), encoding="utf-8")
    if (out / "bench" / "pareto.png").exists():
        shutil.copyfile(out / "bench" / "pareto.png", out / "pareto.png")
    return rep
