"""Soft labels from a served teacher's logprobs, measured: two students trained on the same
teacher-labelled rows, one on the hard labels only, one also on the teacher's label distribution
recovered from the ``top_logprobs`` of its API (``training.logit_kd.source: api_logprobs``).

Run (after `make demo`, which leaves the teacher, its serve artifact and the student init in runs/demo):

    python examples/banking77/soft_labels.py --out runs/soft_labels

1. ``edgedistill serve`` runs the teacher (``--teacher``: a GGUF made from runs/demo/teacher by
   ``compress.gguf.build``, or by default the demo's hf artifact runs/demo/work/teacher_artifact) on
   127.0.0.1: a real OpenAI-compatible server returning logprobs.
2. ``--rows`` inputs of the demo's training data (a fixed shuffle) are labelled by it through the
   distill stage's own code (OpenAITeacher, label_requests asking ``logprobs: true, top_logprobs:
   20``, attach_labels recovering ``soft_labels``); answers are cached under OUT/cache.
3. Two students start from the demo's student init (6 of the teacher's 30 layers) and train with the
   spec's settings for ``--epochs``: hard labels only, and with the label KL (the spec's T and alpha).
4. Both are scored on ``--dev`` rows of the held-out dev split (stratified as the pipeline does):
   the student's distribution over the labels (softmax of each label's summed token log-probability
   after the prompt, i.e. the label-constrained answer distribution), argmax as the prediction and
   its probability as the confidence: accuracy with its Wilson 95 % interval, ECE (10 bins), NLL.

Writes OUT/soft_labels.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from edgedistill.distill.cache import ResponseCache
from edgedistill.distill.encode import encode_example
from edgedistill.distill.generate import attach_labels, label_requests
from edgedistill.distill.label_kd import label_scores
from edgedistill.distill.teacher_api import OpenAITeacher
from edgedistill.distill.train import train
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgedistill.metrics import expected_calibration_error, wilson_interval
from edgedistill.spec import LogitKDConfig, load_spec

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: Path, port: int, threads: int) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).with_name("edgedistill")), "serve", str(artifact), "--port", str(port), "--n-threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "EDGEDISTILL_CONFIG": ""})
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"edgedistill serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("edgedistill serve did not start")


def label_rows(spec, rows: list[dict], artifact: Path, out: Path, threads: int) -> tuple[list[dict], dict]:
    port = free_port()
    proc = start_server(artifact, port, threads)
    try:
        with ResponseCache(out / "cache" / "teacher.sqlite") as cache:
            model = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"][0]["id"]
            teacher = OpenAITeacher(f"http://127.0.0.1:{port}/v1", model, cache=cache, max_concurrency=4, timeout_s=300)
            reqs = label_requests(spec, rows)
            t0 = time.time()
            results = teacher.run_chat_many(reqs)
            attach_labels(spec, rows, reqs, results, teacher)
            took = time.time() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    kept = [r for r in rows if r.get("output") is not None]
    soft = [r["soft_labels"] for r in kept if r.get("soft_labels")]
    stats = {
        "labelled": len(rows),
        "valid_labels": len(kept),
        "with_soft_labels": len(soft),
        "labelling_s": round(took, 1),
        "mean_teacher_top_p": sum(max(s.values()) for s in soft) / max(len(soft), 1),
        "rows_with_second_label_over_1e-3": sum(1 for s in soft if len(s) > 1 and sorted(s.values())[-2] >= 1e-3),
        "sum_to_one_max_error": max((abs(sum(s.values()) - 1.0) for s in soft), default=0.0),
    }
    return kept, stats


@torch.no_grad()
def evaluate(model_dir: Path, spec, dev: list) -> dict:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    labels = list(spec.task.labels)
    conf, correct, nll = [], [], []
    for row in dev:
        msgs = spec.task.student_messages(row.input)
        enc = [encode_example(tok, msgs, lab, spec.training.max_length) for lab in labels]
        n = max(len(e["input_ids"]) for e in enc)
        ids = torch.full((len(enc), n), tok.pad_token_id or 0)
        att = torch.zeros((len(enc), n), dtype=torch.long)
        tgt = torch.full((len(enc), n), -100)
        for i, e in enumerate(enc):
            k = len(e["input_ids"])
            ids[i, :k], att[i, :k], tgt[i, :k] = torch.tensor(e["input_ids"]), 1, torch.tensor(e["labels"])
        target = tgt[:, 1:]
        keep = torch.nonzero((target != -100).any(0)).squeeze(-1)
        logits = model(input_ids=ids, attention_mask=att, logits_to_keep=keep).logits
        probs = torch.softmax(label_scores(logits, target[:, keep]), -1)
        pred = int(probs.argmax())
        conf.append(float(probs[pred]))
        correct.append(labels[pred] == row.output)
        nll.append(-math.log(max(float(probs[labels.index(row.output)]), 1e-12)))
    k, n = sum(correct), len(correct)
    lo, hi = wilson_interval(k, n)
    return {"n": n, "correct": k, "accuracy": k / n, "accuracy_ci95": [lo, hi], "ece": expected_calibration_error(conf, correct),
            "nll": sum(nll) / n, "mean_confidence": sum(conf) / n}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=Path, default=HERE / "task.yaml")
    ap.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo", help="the finished demo run")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "soft_labels")
    ap.add_argument("--teacher", type=Path, default=None,
                    help="what `edgedistill serve` runs as the teacher: a .gguf or an artifact folder (default: DEMO/work/teacher_artifact)")  # fmt: skip
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--dev", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of the served teacher")
    args = ap.parse_args()

    spec = load_spec(args.spec)
    kd = LogitKDConfig(enabled=True, source="api_logprobs", top_logprobs=20, temperature=spec.training.logit_kd.temperature,
                       alpha=spec.training.logit_kd.alpha)  # fmt: skip
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"logit_kd": kd, "epochs": args.epochs})})
    args.out.mkdir(parents=True, exist_ok=True)

    data = [json.loads(x) for x in (args.demo / "data" / "train.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(data)
    rows = [{"id": r["id"], "input": r["input"], "source": r["source"]} for r in data[: args.rows]]
    kept, stats = label_rows(spec, rows, args.teacher or args.demo / "work" / "teacher_artifact", args.out, args.threads)
    print(json.dumps({"labelling": stats}, indent=1), flush=True)

    dev = spec.task.stratified(spec.load_test_set(), args.dev)
    base = args.demo / "work" / "student_init-0-6-12-18-24-29"
    results = {"labelling": stats, "settings": {"rows": args.rows, "epochs": args.epochs, "dev": len(dev), "T": kd.temperature, "alpha": kd.alpha}}
    for name, with_soft in (("hard labels", False), ("soft labels (api_logprobs)", True)):
        cfg = spec.training.model_copy(update={"logit_kd": kd.model_copy(update={"enabled": with_soft})})
        examples = [{"messages": spec.task.student_messages(r["input"]), "answer": spec.task.format_answer(r["output"])}
                    | ({"soft_labels": r["soft_labels"]} if with_soft and r.get("soft_labels") else {}) for r in kept]  # fmt: skip
        out = args.out / ("student-soft" if with_soft else "student-hard")
        t0 = time.time()
        res = train(base, out, examples, cfg, log=lambda d, name=name: print(f"  {name}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}), flush=True))
        scores = evaluate(out, spec, dev)
        scores.update(train_s=round(time.time() - t0, 1), steps=res["steps"], final_loss=res["final_loss"], soft_label_rows=res["soft_label_rows"])
        results[name] = scores
        print(name, json.dumps(scores), flush=True)
        (args.out / "soft_labels.json").write_text(json.dumps(results, indent=1))

    print(f"\n| student ({len(kept)} rows, {args.epochs:g} epoch(s)) | accuracy (95% CI) | ECE | NLL |\n|---|---|---|---|")
    for name in ("hard labels", "soft labels (api_logprobs)"):
        s = results[name]
        print(f"| {name} | {s['accuracy']:.3f} ({s['accuracy_ci95'][0]:.3f}-{s['accuracy_ci95'][1]:.3f}) | {s['ece']:.3f} | {s['nll']:.3f} |")


if __name__ == "__main__":
    main()
