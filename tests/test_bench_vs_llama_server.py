"""bench/vs_llama_server.py without servers: it skips with one line when llama-server is missing,
sends llama-server the task's constraint and the messages ours decodes, and reports best and
median with the ratios; the task ceiling runs serve's engine in-process (on the fake runner)."""

from __future__ import annotations

from edgedistill.bench import vs_llama_server as vs
from edgedistill.bench.ceiling import request_ceiling
from edgedistill.runtimes.constrain import LabelSet
from edgedistill.runtimes.gbnf import labels_gbnf, schema_gbnf

from edgedistill.task import Task
from tests.serve_fakes import FakeRunner

SCHEMA = {"type": "object", "properties": {"people": {"type": "string"}}, "required": ["people"]}


def test_skips_with_one_line_without_llama_server(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEDISTILL_TOOLS", str(tmp_path))
    monkeypatch.delenv("LLAMA_SERVER_BIN", raising=False)
    assert vs.llama_server_bin(None) is None
    vs.main(["--out", str(tmp_path / "out.json")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("vs_llama_server: skipped, nothing measured") and "make llama-tools" in err and "\n" not in err
    assert not (tmp_path / "out.json").exists()


def test_task_requests_carry_the_same_messages_and_constraint():
    cls = Task(type="classification", instructions="Classify.", labels=["card_arrival", "lost_card"])
    route, body = vs.task_request(vs.LLAMA_SERVER, cls, "where is my card", 16)
    assert route == "/v1/chat/completions" and body["messages"] == cls.student_messages("where is my card")
    assert '"card_arrival"' in body["grammar"] and body["temperature"] == 0 and body["max_tokens"] == 16
    ext = Task(type="extraction", instructions="Extract.", output_schema=SCHEMA)
    _, body = vs.task_request(vs.LLAMA_SERVER, ext, "a table for two", 32)
    assert body["grammar"] == schema_gbnf(ext.answer_schema())  # the export's answer.gbnf
    assert body["messages"] == ext.student_messages("a table for two") and "response_format" not in body
    assert vs.task_request("ours", cls, "x", 16) == ("/v1/predict", {"input": "x", "fallback": False})


def test_the_labels_grammar_is_the_exported_one():
    labels = ["card_arrival", 'say "hi"', "back\\slash", "tab\there", "café"]
    cls = Task(type="classification", instructions="Classify.", labels=labels)
    text = vs.task_request(vs.LLAMA_SERVER, cls, "x", 16)[1]["grammar"]
    assert text == labels_gbnf(labels)  # what the export writes without a tokenizer
    alternatives = [line.strip().rstrip(" |") for line in text.splitlines() if line.startswith("    ")]
    assert alternatives[1] == '"say \\"hi\\""' and alternatives[3] == '"tab\\x09here"'
    tokens = [[1, 2], [3], [4, 5, 6], [7], [8]]  # the artifact's tokenization: the export's token form
    token_form = vs.task_request(vs.LLAMA_SERVER, cls, "x", 16, tokens)[1]["grammar"]
    assert token_form == labels_gbnf(labels, tokens)
    assert [line.strip().rstrip(" |") for line in token_form.splitlines() if line.startswith("    ")][:2] == ["<[1]> <[2]>", "<[3]>"]


def test_summary_best_median_and_ratios():
    rows = [
        {"workload": "chat", "target": t, "concurrency": 1, "value": v, "unit": "tokens/s"}
        for t, v in [("llama-server", 80.0), ("ours", 66.0), (vs.CEILING, 95.0), (vs.CEILING, 100.0), ("llama-server", 90.0), ("ours", 70.0)]
    ]
    (ls, ours, ceiling) = vs.summarize(rows)
    assert (ls["best"], ls["median"], ls["vs_llama_server_best"]) == (90.0, 85.0, None)
    assert ls["of_ceiling_best"] == 0.9 and ceiling["of_ceiling_best"] is None  # the ceiling's best round: 100
    assert ceiling["vs_llama_server_best"] == 1.111 and ceiling["rounds"] == [95.0, 100.0]
    assert (ours["best"], ours["median"], ours["rounds"]) == (70.0, 68.0, [66.0, 70.0])
    assert ours["vs_llama_server_best"] == 0.778 and ours["vs_llama_server_median"] == 0.8  # 70/90, 68/85
    assert ours["of_ceiling_best"] == 0.7 and ours["unit"] == "tokens/s"
    assert "0.78x / 0.80x" in vs.table([ls, ours])


def test_request_ceiling_answers_every_prompt_and_leaves_the_runner_open():
    runner = FakeRunner(lambda p: ("card_arrival", 20.0))
    labels = LabelSet.build(runner, ["card_arrival", "lost_card"])
    prompts = [runner.tokenize(f"user: {i}\n<|assistant|>", special=True, add_bos=False) for i in range(6)]
    calls = len(runner.batches)
    res = request_ceiling(runner, prompts, labels, 2, 16, warmup=2)
    assert res["requests"] == 6 and res["requests_per_s"] > 0 and not runner.closed
    # each wave of two (the warm-up's, then three): its prompts' prefill picks the first byte (c or
    # l), and the rest of "card_arrival" and the fake's single end token are forced: no more calls
    assert len(runner.batches) - calls == 4
