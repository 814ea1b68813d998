"""Compress calibrates every artifact it measures: the confidence calibration (temperature per task
type), the cascade's thresholds for 95/98/99 % of the teacher's quality and the recommended one,
fitted on the distillation data's calibration split (``data/calibration.jsonl``: teacher-labelled,
held out of training, never the test set) through the code path of ``/v1/predict``
(``python -m edgedistill.serve.calibrate``, run as its own process: stages talk through artifacts);
and the ECE on the test split before and after. Stored as the
manifest's ``calibration`` block, which ``edgedistill serve ARTIFACT`` reads.

An older data folder without the split: a printed note, the artifact keeps temperature 1 and is
served at 0.9. A calibration that cannot run (e.g. too few answers parsed) is a printed note too:
it never fails compress.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgedistill.manifest import sha256_file, sha256_json
from edgedistill.thresholds import THRESHOLD_RULE, unmet_note

CALIBRATION_FILE = "calibration.jsonl"  # the split in distill's data folder (its manifest records the hash)


def calibration_split(calibration: Path, checkpoint: Path) -> Path:
    """Where the calibration split is: in the ``--calibration`` data folder, else in the distill
    run's ``data/`` beside the checkpoint."""
    folder = Path(calibration) if Path(calibration).is_dir() else Path(checkpoint).parent / "data"
    return folder / CALIBRATION_FILE


def calibration_inputs(split: Path, test_rows: list[dict[str, Any]], manifest: dict[str, Any]) -> dict[str, str]:
    """What a stored calibration was fitted from: the split, the test rows, the artifact's files."""
    return {"data": sha256_file(split), "test": sha256_json(test_rows), "artifact": sha256_json(manifest.get("files"))}


def calibrate(
    folder: Path, manifest: dict[str, Any], split: Path, test_rows: list[dict[str, Any]], work: Path, console: Any
) -> dict[str, Any] | None:
    """The artifact's ``calibration`` block (fitted now, or the stored one when nothing it was
    fitted from changed), or None with a printed note when there is nothing to fit it on."""
    name = folder.name
    if not split.exists():
        console.print(
            f"[yellow]{name}: no calibration split ({split}; `edgedistill distill` makes one): "
            "confidence left uncalibrated, served at threshold 0.9[/]"
        )
        return None
    inputs = calibration_inputs(split, test_rows, manifest)
    old = manifest.get("calibration") or {}
    if old.get("inputs") == inputs and old.get("threshold_rule") == THRESHOLD_RULE and old.get("test") and "curve" in old:
        console.print(f"{name}: calibration unchanged, reusing it (recommended threshold {old['recommended']['threshold']})")
        if old["recommended"].get("met") is False:
            console.print(f"[yellow]  {name}: {unmet_note(old['recommended'], old['n'])}[/]")
        return old
    console.print(f"calibrating {name} on {split} ...")
    test_file, fit_file = work / f"calibration-{name}-test.jsonl", work / f"calibration-{name}.json"
    work.mkdir(parents=True, exist_ok=True)
    test_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in test_rows), encoding="utf-8")
    fit_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "edgedistill.serve.calibrate", str(folder), str(split), "--test-data", str(test_file),
           "--dry-run", "--json-out", str(fit_file)]  # fmt: skip
    code, why = run_calibration(cmd)
    if code != 0 or not fit_file.exists():
        console.print(
            f"[yellow]{name}: not calibrated ({why.removeprefix('error: ') or f'exit code {code}'}); served at threshold 0.9[/]"
        )
        return None
    cal = json.loads(fit_file.read_text(encoding="utf-8"))
    cal["inputs"] = inputs
    rec, test = cal["recommended"], cal["test"]
    console.print(
        f"  {name}: temperature {cal['temperature']}, test ECE {test['ece_before']} -> {test['ece_after']}, "
        f"recommended threshold {rec['threshold']} (target {rec['target']:g} of the teacher on {cal['n']} rows)"
    )
    if rec.get("met") is False:
        console.print(f"[yellow]  {name}: {unmet_note(rec, cal['n'])}[/]")
    return cal


def run_calibration(cmd: list[str]) -> tuple[int, str]:
    """Serve's calibration command (``python -m edgedistill.serve.calibrate``): its exit code and its
    last stderr line. A separate process: serve's engine is serve's, compress only reads the result."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = proc.stderr.strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


def summary_of(cal: dict[str, Any] | None) -> dict[str, Any]:
    """compress.json's calibration fields for one artifact (``ece_before``/``ece_after``: on the test split)."""
    if not cal:
        return {"calibration": None}
    test = cal.get("test") or {}
    return {
        "ece_before": test.get("ece_before"),
        "ece_after": test.get("ece_after"),
        "calibration": {
            "method": cal.get("method"), "temperature": cal.get("temperature"), "n": cal.get("n"),
            "ece_before": cal.get("ece_before"), "ece_after": cal.get("ece_after"), "test": test or None,
            "thresholds": cal.get("thresholds"), "recommended": cal.get("recommended"), "curve": cal.get("curve"),
        },
    }  # fmt: skip


def calibration_cells(r: dict[str, Any]) -> list[str]:
    cal = r.get("calibration") or {}
    if r.get("ece_before") is None:
        return ["-", "-"]
    return [f"{r['ece_before']:.3f} → {r['ece_after']:.3f}", f"{(cal.get('recommended') or {}).get('threshold', '-')}"]


def calibration_note(summary: dict[str, Any]) -> str:
    if not any(r.get("ece_before") is not None for r in summary["artifacts"]):
        return ""
    return (
        "\nECE: calibration error of /v1/predict's confidence on the test split, uncalibrated → with the temperature fitted on "
        "the calibration split; threshold (99 %): the cheapest reaching 99 % of the teacher there, its n rows counted as n/(n+1) "
        "of what they measure (so a small split cannot meet a high target by luck), what serve uses by default.\n"
    )
