# Run:  make demo-drift     (after `make demo`; = python examples/banking77/drift.py --run runs/demo)
"""The cascade in production on BANKING77, scripted: traffic drifts, the server notices, the
student is re-distilled from its own traffic, and the fallback rate falls again.

Against a finished ``edgedistill run`` (RUN, default runs/demo), one command:

1. traffic   three disjoint sets of real train-split messages of the task's intents
             (``drift_traffic``: never a dev row): ``before`` as written, ``drifted`` and ``fresh``
             rewritten as chatty, lower-cased e-mails with typos (a style the generator never wrote);
2. servers   the teacher (``edgedistill serve`` on the run's teacher, as ``edgedistill run`` serves it)
             and the cascade, ``edgedistill serve RUN --teacher-url ... --traffic-log RUN/drift/traffic
             --shadow-rate 0.2`` (RUN: the artifact RUN/serving.json points at, else the run's cascade);
3. before, during   ``before`` then ``drifted`` sent to /v1/predict one at a time, each phase on a
             fresh cascade process (its live windows then hold that phase only); /metrics scraped once
             the traffic log holds a record for every request (every shadow check ended); the cascade
             stopped with SIGTERM (the log flushed); the teacher asked every row directly (the truth);
4. retrain   ``edgedistill retrain examples/banking77/task.yaml --traffic RUN/drift/traffic --run RUN``;
5. after     the cascade restarted on what RUN/serving.json now points at (the old artifact when the
             new one was not promoted: the report says so), ``fresh`` sent and measured the same way;
             after a promotion the old artifact answers the same ``fresh`` rows alone (``fallback: false``),
             so the two are compared on the same rows at equal cascade accuracy;
6. report    RUN/drift/report.json and report.md (``drift_report``): per phase the drift score, the
             live agreement estimate with its interval beside the true agreement, the fallback rate,
             the cascade accuracy (95 % intervals) and the cost per 1k requests.

What was sent is in RUN/drift/traffic-sets.jsonl, each answer in answers.json, each server's output
in logs/. A rerun starts the traffic over (RUN/drift/traffic*) and improves on whatever is served
then (after a promotion: the new artifact, and the next retrain continues from its student).
``--no-retrain`` runs the loop without step 4 (the after phase then serves the same artifact).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, wherever this is started from
from drift_report import build_report, parse_metrics, report_markdown, total
from drift_traffic import SEED, SETS, Row, describe, make_sets

from edgedistill.errors import UserError
from edgedistill.spec import TaskSpec, load_spec

SPEC = Path(__file__).resolve().parent / "task.yaml"
PHASES = (("before", "before"), ("during", "drifted"), ("after", "fresh"))  # (phase, traffic set)
DRAIN_TIMEOUT_S = 900  # the shadow checks still queued when the last request was answered


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="the `edgedistill run` folder (default runs/demo)")
    p.add_argument("--spec", type=Path, default=SPEC, help="its task spec (default examples/banking77/task.yaml)")
    for name, n in (("before", 200), ("drifted", 300), ("fresh", 300)):
        p.add_argument(f"--{name}", type=int, default=n, help=f"rows in the {name} set (default {n})")
    p.add_argument("--shadow-rate", type=float, default=0.2, help="the cascade's --shadow-rate (default 0.2)")
    p.add_argument("--seed", type=int, default=SEED, help=f"the traffic's seed (default {SEED})")
    p.add_argument("--no-retrain", action="store_true", help="skip step 4 (a dry run of the loop: 'after' serves the same artifact)")
    a = p.parse_args(argv)
    try:
        rep = run_scenario(a.spec, a.run, {"before": a.before, "drifted": a.drifted, "fresh": a.fresh}, a.shadow_rate, a.seed,
                           retrain=not a.no_retrain)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except httpx.HTTPError as e:
        print(f"error: a server stopped answering ({type(e).__name__}: {e}); its log is in {a.run / 'drift' / 'logs'}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: the servers were stopped; run the same command again to start over", file=sys.stderr)
        sys.exit(130)
    print(report_markdown(rep))


def run_scenario(spec_path: Path, run: Path, sizes: dict[str, int], shadow_rate: float, seed: int, retrain: bool = True) -> dict[str, Any]:
    from edgedistill.serve.artifact import run_artifact

    if not (run / "report.json").exists():
        raise UserError(f"{run} has no report.json: run `make demo` first (or pass --run RUN, a finished `edgedistill run`)")
    if not 0 < shadow_rate <= 1:
        raise UserError(f"--shadow-rate {shadow_rate}: give a share in (0, 1]")
    if any(n < 1 for n in sizes.values()):
        raise UserError("--before, --drifted and --fresh need at least 1 row each")
    spec = load_spec(spec_path)
    if spec.teacher.kind != "local":
        raise UserError("the drift scenario serves the run's local teacher; this spec's teacher is an API (teacher.kind: openai)")
    out = run / "drift"
    for old in ("traffic", "traffic-after", "logs"):
        shutil.rmtree(out / old, ignore_errors=True)  # a rerun starts over (the report is rewritten)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    say(f"traffic: {sizes} rows from the train split (seed {seed})")
    sets = make_sets(spec, sizes, seed)
    with (out / "traffic-sets.jsonl").open("w", encoding="utf-8") as f:
        for name in SETS:
            for r in sets[name]:
                f.write(json.dumps({"set": r.set, "text": r.text, "label": r.label, "source": r.source}) + "\n")

    servers = Servers(spec, run, out / "logs")
    phases: list[dict[str, Any]] = []
    same_rows_old: dict[str, Any] | None = None
    retrain_info: dict[str, Any] | None = None
    cascade_cmd = ""
    try:
        teacher_url = servers.teacher()
        for phase, name in PHASES:
            if phase == "after":
                retrain_info = do_retrain(spec_path, run, out / "traffic") if retrain else None
            art, source = run_artifact(run)  # what `edgedistill serve RUN` will serve
            log = out / ("traffic-after" if phase == "after" else "traffic")  # the retrain reads only what came before it
            cascade_cmd = (f"edgedistill serve {run} --teacher-url {teacher_url} --teacher-model teacher --traffic-log {log} "
                           f"--shadow-rate {shadow_rate}")
            say(f"{phase}: {len(sets[name])} {name} rows through the cascade on {art} ({source})")
            url = servers.cascade(phase, teacher_url, log, shadow_rate)
            threshold = served_threshold(url)
            answers, wall_s = send_predict(url, sets[name], phase, spec)
            metrics = wait_for_log(url, len(answers))
            servers.stop_cascade()
            say(f"{phase}: asking the teacher every row directly (the truth)")
            ask_teacher(spec, teacher_url, sets[name], answers)
            phases.append({"name": phase, "set": name, "artifact": str(art), "artifact_source": source, "metrics": metrics,
                           "threshold": threshold, "answers": answers, "wall_s": wall_s, "log_records": count_records(log),
                           "log": read_log(log)})
        old_art, fresh = phases[1]["artifact"], PHASES[-1][1]
        if phases[-1]["artifact"] != old_art:  # promoted: the old artifact on the same fresh rows, for the comparison
            say(f"same rows: the {fresh} rows through the old artifact ({old_art}), the student alone")
            url = servers.student("old", Path(old_art))
            same_rows_old = {"artifact": old_art, "threshold": phases[1]["threshold"],  # as it was served
                             "answers": send_predict(url, sets[fresh], "old", spec, fallback=False)[0]}
            servers.stop_cascade()
    finally:
        servers.stop_all()

    if not retrain:
        retrain_info = {"promoted": None, "reason": "skipped (--no-retrain)", "command": "-",
                        "note": "No retrain was run: the after phase served the same artifact as before."}
    elif retrain_info and not retrain_info.get("promoted"):
        retrain_info["note"] = f"The new artifact was not promoted: the after phase served the old one ({phases[-1]['artifact']})."
    rep = build_report(phases, spec.task.same_answer, spec.bench.machine_usd_per_hour, task=spec.name, run=str(run),
                       traffic={**describe(sets, seed), "shadow_rate": shadow_rate}, retrain=retrain_info, cascade_command=cascade_cmd,
                       old_on_fresh=same_rows_old)
    for p, row in zip(phases, rep["phases"]):
        row["wall_s"], row["log_records_on_disk"] = round(p["wall_s"], 1), p["log_records"]
    kept = [{k: p[k] for k in ("name", "set", "artifact", "threshold", "answers")} for p in phases]
    if same_rows_old:
        kept.append({"name": "old-on-fresh", "set": "fresh", **same_rows_old})
    (out / "answers.json").write_text(json.dumps(kept))
    (out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(rep))
    say(f"wrote {out / 'report.md'} and {out / 'report.json'}")
    return rep


def say(msg: str) -> None:
    print(f"[drift] {msg}", file=sys.stderr, flush=True)


class Servers:
    """The teacher (up for the whole scenario) and one cascade process at a time, as `edgedistill run` starts them."""

    def __init__(self, spec: TaskSpec, run: Path, logs: Path):
        from edgedistill.run import servers as s

        self.s, self.spec, self.run, self.logs = s, spec, run, logs
        self.threads = str(spec.bench.threads or os.cpu_count() or 1)
        self.procs: dict[str, Any] = {}

    def _up(self, name: str, cmd: list[str], key: str | None = None) -> str:
        srv = self.s._start(name, cmd, self.logs)  # its output: RUN/drift/logs/<name>.log
        self.procs[key or name] = srv
        self.s._wait_ready(srv)
        return srv.url

    def teacher(self) -> str:
        artifact = self.s._served_teacher(self.spec, self.run)
        say(f"starting the teacher ({artifact})")
        url = self._up("teacher", [*self.s._serve_cmd(artifact, self.s._free_port(), self.threads), "--model-alias", "teacher"])
        return url + "/v1"

    def cascade(self, phase: str, teacher_url: str, log: Path, shadow_rate: float) -> str:
        cmd = [*self.s._serve_cmd(self.run, self.s._free_port(), self.threads), "--teacher-url", teacher_url, "--teacher-model", "teacher",
               "--traffic-log", str(log), "--shadow-rate", str(shadow_rate)]
        if self.spec.bench.cascade_threshold is not None:  # as `edgedistill run` serves it
            cmd += ["--threshold", str(self.spec.bench.cascade_threshold)]
        return self._up(f"cascade-{phase}", cmd, key="cascade")

    def student(self, name: str, artifact: Path) -> str:
        """An artifact served alone (no teacher, no log): its student's own answers and confidences."""
        return self._up(f"student-{name}", self.s._serve_cmd(artifact, self.s._free_port(), self.threads), key="cascade")

    def stop_cascade(self) -> None:
        """SIGTERM, as an orchestrator stops it: in-flight work finished, the traffic log flushed."""
        srv = self.procs.pop("cascade", None)
        if srv is None or srv.proc.poll() is not None:
            return
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(120)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            raise UserError(f"the cascade did not stop within 120 s of SIGTERM; log: {srv.log}") from None

    def stop_all(self) -> None:
        self.stop_cascade()
        for srv in self.procs.values():
            self.s._stop(srv)
        self.procs.clear()


def served_threshold(url: str) -> float:
    """The threshold the server applies (``GET /v1/models``)."""
    return float(httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["edgedistill"]["threshold"])


def send_predict(url: str, rows: list[Row], phase: str, spec: TaskSpec, fallback: bool = True) -> tuple[list[dict[str, Any]], float]:
    """Each row to /v1/predict, one at a time; the served answer, who answered, the latency, and the
    student's own answer (``student``, parsed from ``edgedistill.student_output``) beside its confidence."""
    answers = []
    t_start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=300) as c:
        for i, row in enumerate(rows, 1):
            t0 = time.perf_counter()
            r = c.post("/v1/predict", json={"input": row.text, **({} if fallback else {"fallback": False})})
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                raise UserError(f"{phase}: the cascade answered HTTP {r.status_code} to a request: {r.text[:200]}")
            body = r.json()
            own, err = spec.task.parse_answer(body["edgedistill"]["student_output"], None)
            answers.append({"label": row.label, "served": body["output"], "answered_by": body["answered_by"],
                            "student": None if err else own, "confidence": body["confidence"], "latency_s": dt,
                            "request_id": r.headers.get("x-request-id")})
            if i % 50 == 0 or i == len(rows):
                by_t = sum(a["answered_by"] == "teacher" for a in answers)
                say(f"{phase}: {i}/{len(rows)} answered, {by_t} by the teacher")
    return answers, time.perf_counter() - t_start


def wait_for_log(url: str, n: int) -> str:
    """/metrics once the traffic log has written ``n`` records: every shadow check has ended."""
    deadline = time.time() + DRAIN_TIMEOUT_S
    while True:
        text = httpx.get(url + "/metrics", timeout=30).text
        m = parse_metrics(text)
        done = total(m, "edgedistill_traffic_log_records_total") + total(m, "edgedistill_traffic_log_dropped_total")
        done += total(m, "edgedistill_traffic_log_errors_total")
        if done >= n:
            return text
        if time.time() > deadline:
            say(f"warning: after {DRAIN_TIMEOUT_S} s the traffic log holds {done:.0f} of {n} records; scraping now")
            return text
        time.sleep(0.5)


def ask_teacher(spec: TaskSpec, teacher_url: str, rows: list[Row], answers: list[dict[str, Any]]) -> None:
    """The teacher's own answer to every row, asked the way the cascade asks it (``serve.cascade.teacher_body``)."""
    task = spec.task
    shaped = task.response_format()
    with httpx.Client(base_url=teacher_url, timeout=300) as c:
        for row, a in zip(rows, answers):
            body = {"model": "teacher", "messages": task.teacher_messages(row.text), "max_tokens": task.output_budget, "temperature": 0}
            if shaped:
                body["response_format"] = shaped
            t0 = time.perf_counter()
            r = c.post("/chat/completions", json=body)
            a["teacher_latency_s"] = time.perf_counter() - t0
            a["teacher"] = None
            if r.status_code == 200:
                ch = r.json()["choices"][0]
                content = (ch.get("message") or {}).get("content")
                if isinstance(content, str):
                    value, err = task.parse_answer(content, ch.get("finish_reason"))
                    a["teacher"] = None if err else value


def do_retrain(spec_path: Path, run: Path, traffic: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "edgedistill.cli", "retrain", str(spec_path), "--traffic", str(traffic), "--run", str(run)]
    shown = f"edgedistill retrain {spec_path} --traffic {traffic} --run {run}"
    say(f"retrain: {shown}")
    if subprocess.run(cmd, check=False).returncode != 0:
        raise UserError(f"`{shown}` failed (its error is above); the servers were stopped")
    done = sorted((int(m.group(1)), p) for p in run.glob("retrain-*") if (m := re.search(r"retrain-(\d+)$", p.name)))
    rep = json.loads((done[-1][1] / "retrain.json").read_text())
    d = rep["decision"]
    return {"command": shown, "folder": str(done[-1][1]), "report": str(done[-1][1] / "retrain.md"), "promoted": d["promoted"],
            "reason": d["reason"], "old": (rep.get("old") or {}).get("artifact"), "new": (rep.get("new") or {}).get("artifact"),
            "data": (rep.get("data") or {}).get("traffic")}


def count_records(log: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in log.glob("*.jsonl")) if log.is_dir() else 0


def read_log(log: Path) -> list[dict[str, Any]]:
    """The phase's traffic-log records (the report compares its shadow verdicts with the truth)."""
    out = []
    for p in sorted(log.glob("*.jsonl")) if log.is_dir() else []:
        out += [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


if __name__ == "__main__":
    main()
