"""One typed, validated run configuration: YAML file + dotted ``KEY=VALUE`` overrides.

Every switch of a run lives here, so that a wrong key or value fails at load time with its
dotted name (``sampler.alpha``), never halfway through a run.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hybridray.data.schema import OPTIONAL_COLUMNS, REQUIRED_COLUMNS
from hybridray.errors import UserError


class _Section(BaseModel):
    # No infinite or NaN numbers (``cpus_per_worker: .inf`` would pass ``gt=0``).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value, info):
        # YAML's ``yes`` / ``true`` is a boolean; pydantic would read it as 1 for a number field
        # (``sampler.alpha: yes`` -> 1.0). Only fields that take a boolean take one.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and not _takes_bool(annotation):
            raise ValueError(f"expected a {_kind(annotation)}, got a boolean ({value})")
        if isinstance(value, (list, dict)) and _holds_bool(value) and not _takes_bool(annotation):
            raise ValueError(f"expected a {_kind(annotation)}, got a boolean inside {value!r:.60}")
        # ... and the other way round: pydantic would read 0, 1.0 or "yes" as a boolean.
        if value is not None and not isinstance(value, bool) and _only_bool(annotation):
            raise ValueError(f"expected true or false, got {value!r:.40}")
        return value


def _holds_bool(value) -> bool:
    if isinstance(value, bool):
        return True
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return any(_holds_bool(v) for v in items)


def _takes_bool(annotation) -> bool:
    import typing

    if annotation is bool or annotation is Any:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True  # a section checks its own fields
    return any(_takes_bool(a) for a in typing.get_args(annotation) if a is not type(None))


def _only_bool(annotation) -> bool:
    import typing

    return annotation is bool or (typing.get_origin(annotation) is Union and
                                  {a for a in typing.get_args(annotation)} <= {bool, type(None)})


def _kind(annotation) -> str:
    import typing

    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return " or ".join(_kind(a) for a in args) if args else getattr(annotation, "__name__", str(annotation))


class LoraSection(_Section):
    """LoRA adapters through ``peft``: the base model is frozen, only the adapters train."""

    #: Rank of each adapter's low-rank update.
    r: int = Field(16, ge=1, le=1024)
    #: Scaling numerator: the update is multiplied by ``alpha / r``.
    alpha: float = Field(32.0, gt=0.0)
    #: Dropout on the adapter input (0 keeps multi-worker runs bit-comparable to one worker).
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    #: Module names to adapt (suffixes, e.g. [q_proj, v_proj]) or ``all-linear``.
    target_modules: Union[list[str], Literal["all-linear"]] = "all-linear"
    #: Also export the adapter alone (``adapter/``, loadable with ``peft``) beside the merged model.
    save_adapter: bool = True

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("name at least one module, or use all-linear")
        return value


class ModelConfig(_Section):
    """The encoder: any HF id or local path, or a builtin (``builtin:multilingual-e5-small``,
    rebuilt offline from PyPI packages; ``builtin:tiny``, random, for tests;
    ``builtin:tiny-decoder``, a random 2-layer Mistral-style decoder, for tests).

    Decoder LLMs (any causal LM of transformers: Mistral, Llama, Qwen2, Gemma, ...) take
    ``pooling: last``; see ``hybridray/models/decoder.py`` for their tokenizer recipe."""

    name_or_path: str = "builtin:multilingual-e5-small"
    pooling: Literal["mean", "cls", "last"] = "mean"
    #: None = the model family's default (``query: `` / ``passage: `` for E5, an instruction
    #: prompt for decoder embedders, empty otherwise).
    query_prefix: Optional[str] = None
    passage_prefix: Optional[str] = None
    max_query_length: int = Field(48, ge=4, le=8192)
    max_passage_length: int = Field(96, ge=4, le=8192)
    #: Freeze the word-embedding table (most parameters of a small multilingual encoder).
    freeze_embeddings: bool = True
    #: Append the EOS token to every text (last-token pooling then reads it); None = yes for
    #: decoders, no for encoders. Texts that already end with EOS are left alone.
    append_eos: Optional[bool] = None
    #: Tokenizer padding side; None = the tokenizer's own. Pooling is right for either.
    padding_side: Optional[Literal["left", "right"]] = None
    #: Decoders only: bidirectional attention (transformers' ``config.is_causal = False``),
    #: as LLM2Vec-style embedders use; off = the causal attention the model was trained with.
    bidirectional: bool = False
    #: Activation (gradient) checkpointing: keep only each layer's input and recompute the
    #: rest in the backward pass (far less activation memory, about a third more compute).
    activation_checkpointing: bool = False
    #: LoRA adapters (``{r, alpha, dropout, target_modules}``); None = train the full model.
    lora: Optional[LoraSection] = None
    #: Training forward in this many chunks of similar length per side (texts sorted by length,
    #: each chunk padded only to its own longest): less padding, the same loss *function*
    #: (embeddings go back in pair order), but other dropout masks and float rounding, so a
    #: different trajectory: part of the run's identity. Under ZeRO-3 each chunk gathers the
    #: parameters again. 1 = one forward.
    length_buckets: int = Field(1, ge=1, le=64)


class HFSourceConfig(_Section):
    """How an ``hf:NAME_OR_PATH`` source (Hugging Face ``datasets``) maps onto the shard
    schema (hybridray/data/schema.py); see hybridray/data/hf_source.py."""

    #: Dataset configuration name, as in ``load_dataset(path, name)`` (e.g. ``mlqa.de.de``).
    name: Optional[str] = None
    #: The split to read; a dataset saved with ``save_to_disk`` as one split is read as is.
    split: str = "train"
    #: Hub revision (branch, tag or commit) of a hub dataset; None = the default branch.
    revision: Optional[str] = None
    #: Shard column -> dataset column, where the names differ (e.g. ``{query: question}``).
    columns: dict[str, str] = Field(default_factory=dict)
    #: Shard column -> one value for every row, for columns the dataset lacks (e.g.
    #: ``{lang: de}``); ``source`` defaults to the dataset's name.
    constants: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_columns(self) -> "HFSourceConfig":
        known = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
        for key, names in (("columns", self.columns), ("constants", self.constants)):
            unknown = sorted(set(names) - set(known))
            if unknown:
                raise ValueError(f"{key}: {unknown} are not shard columns ({', '.join(known)})")
        both = sorted(set(self.columns) & set(self.constants))
        if both:
            raise ValueError(f"{both} are given in both columns and constants")
        per_row = sorted(set(self.constants) & {"group_id", "query", "passage", "hard_negatives"})
        if per_row:
            raise ValueError(f"constants: {per_row} differ from row to row; map them from columns")
        return self


class ExtraMonoConfig(_Section):
    """Monolingual data with no translations, mixed into monolingual batches."""

    #: A shard dataset (directory, glob or ``s3://`` prefix) or ``hf:NAME_OR_PATH``.
    path: str
    weight: float = Field(0.1, ge=0.0, le=1.0)
    #: Also draw mono steps in this set's languages that data.train lacks (e.g. TyDi sw, ko
    #: next to MLQA-R); false = only data.train's languages (see data/sampler.py).
    new_languages: bool = False
    #: Column mapping of an ``hf:`` path (None = the dataset's columns are the shard's).
    hf: Optional[HFSourceConfig] = None


class DataConfig(_Section):
    """Where the translated-QA shards are (directory, glob or ``s3://`` prefix), or a Hugging
    Face dataset (``hf:NAME_OR_PATH``: a hub id, a ``save_to_disk`` directory or anything
    ``load_dataset`` reads, e.g. a directory of json / parquet files)."""

    train: str = "data/mlqa-r/train"
    #: Column mapping of an ``hf:`` data.train (None = the dataset's columns are the shard's).
    hf: Optional[HFSourceConfig] = None
    #: Held-out LAReQA-layout directory (written by ``hybridray data prepare``); empty = none.
    heldout: str = "data/mlqa-r/heldout-lareqa"
    #: Restrict training to these languages (None = all languages in the shards).
    languages: Optional[list[str]] = None
    #: Fail on the first malformed row instead of reporting it and skipping it.
    strict: bool = False
    max_text_chars: int = Field(4000, ge=16)
    extra_mono: list[ExtraMonoConfig] = Field(default_factory=list)
    #: CPUs each Ray Data task of the batch pipeline asks for (fractional: on a 2-core
    #: machine, train workers plus whole-CPU data tasks starve each other).
    task_cpus: float = Field(0.25, gt=0.0)
    #: Global steps per Ray Data dataset a worker streams at a time, cut at steps (a window may
    #: span chunks): a worker holds at most 2x this many tokenised steps; 0 = the run as one.
    stream_chunk_steps: int = Field(2000, ge=0)


class SamplerConfig(_Section):
    """How global batches are formed (the method).

    ``alpha`` is the probability that a global step is monolingual; ``alpha=1`` and
    ``alpha=0`` are the paper's X-X-mono and X-Y baselines. ``mode: x-x`` is LAReQA's X-X
    baseline (each pair in one language, languages mixed inside the batch).
    """

    alpha: float = Field(0.5, ge=0.0, le=1.0)
    mode: Literal["hybrid", "x-x"] = "hybrid"
    mono_language: Literal["uniform", "proportional"] = "uniform"
    #: Global batch size: query/passage pairs per step across all workers.
    batch_size: int = Field(32, ge=2)
    #: Groups per planning window (streaming unit; see hybridray/data/sampler.py). Must be
    #: at least batch_size; MLQA-R (1,148 groups) fits in one window at the default.
    window_groups: int = Field(100_000, ge=2)


class LossConfig(_Section):
    """InfoNCE over in-batch negatives gathered from every worker."""

    temperature: float = Field(0.05, gt=0.0, le=10.0)
    learn_temperature: bool = False
    #: Add the passage-to-query term.
    symmetric: bool = False
    #: Mask in-batch negatives that share the query's group_id (its translations).
    mask_same_group: bool = True
    #: Hard negatives per query taken from the shards' ``hard_negatives`` column (0: off); written
    #: by ``data prepare`` (the answer paragraph's other sentences) or ``data mine`` (a retriever's).
    #: A row with fewer than k repeats some (unmasked: they weigh more in its softmax); a row with
    #: none is a reject at k > 0 (in the rejects report; data.strict refuses the dataset at it).
    hard_negatives: int = Field(0, ge=0, le=64)
    #: Gradient caching (hybridray/grad_cache.py): 0 = off; else texts per encoder pass, so a
    #: worker's encoder activations are those of this many texts whatever sampler.batch_size
    #: is (the loss's score matrices still grow with the batch). Defines the run: dropout
    #: masks are drawn chunk by chunk, so another value trains along another trajectory. A
    #: value at or above a worker's texts per encoder call saves nothing and costs a forward.
    cache_chunk_size: int = Field(0, ge=0)
    #: Weight of the distillation term against the frozen starting model (0 = off; see
    #: ``InfoNCELoss``): keeps the student's in-batch rankings close to the base model's. The
    #: teacher scores at the current (possibly learned) temperature. It is not checkpointed:
    #: a resume reloads it from model.name_or_path, which must still hold the same model.
    distill_weight: float = Field(0.0, ge=0.0)


class OptimConfig(_Section):
    lr: float = Field(5e-5, gt=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    #: Gradient clipping norm; 0 disables it (DeepSpeed would otherwise clip at 1.0 silently).
    grad_clip: float = Field(1.0, ge=0.0)
    #: Must be 1 (see ``_one_update_per_global_batch``): a global batch is one update; for a
    #: batch larger than memory allows, use loss.cache_chunk_size (gradient caching) instead.
    grad_accum: int = Field(1, ge=1)

    @field_validator("grad_accum")
    @classmethod
    def _one_update_per_global_batch(cls, value: int) -> int:
        # DeepSpeed accumulation would split each forward's rows and still step once per
        # global batch: every update would mix several global batches (a mono and a cross one
        # together), end the LR schedule early and checkpoint mid-accumulation, and in-batch
        # negatives would span one micro-batch only. Gradient caching (loss.cache_chunk_size)
        # is the right way to the same memory: one update per global batch, negatives from all
        # of it. It is not mapped from grad_accum because the two keys would then name one
        # computation twice (and two run identities for it); the message points to it instead.
        if value != 1:
            raise ValueError(
                "values above 1 are not supported: each global batch is one optimizer step with "
                "negatives from the whole batch; to fit a large batch in memory set "
                "loss.cache_chunk_size (gradient caching, e.g. the per-worker batch / the "
                "accumulation steps you wanted) instead"
            )
        return value


class TrainConfig(_Section):
    max_steps: int = Field(150, ge=1)
    #: Held-out evaluation every this many steps (0 = only at the end); a sweep's early
    #: stopping decides on these evaluations.
    eval_every: int = Field(0, ge=0)
    #: Evaluate on a fixed subset of this many held-out queries, with the candidate sentences
    #: of their paragraphs (cheap, for sweeps; see evaluate.lareqa.subset_lareqa); None = all.
    #: Every evaluation of the run uses it, the one before and the one after training too.
    eval_max_queries: Optional[int] = Field(None, ge=1)
    eval_before: bool = True
    checkpoint_every: int = Field(50, ge=0)
    log_every: int = Field(10, ge=1)
    #: Evaluation suite YAML (e.g. configs/eval/suite.yaml) run on the exported model after
    #: training, report in <run>/eval/suite/; None = no suite.
    final_eval_suite: Optional[str] = None


class DeepSpeedConfig(_Section):
    """ZeRO stage and the memory levers (``hybridray plan`` shows what each one saves)."""

    #: 0 = replicate everything; 1 = partition optimizer state; 2 = + gradients;
    #: 3 = + parameters (each worker holds 1/N of the weights, gathered layer by layer).
    zero_stage: int = Field(0, ge=0, le=3)
    #: Keep optimizer state (and its update step) in CPU memory (ZeRO-Offload; stages 1-3).
    offload_optimizer: Literal["none", "cpu"] = "none"
    #: Keep the partitioned parameters in CPU memory (ZeRO-Infinity; stage 3 only).
    offload_param: Literal["none", "cpu"] = "none"
    #: bf16 mixed precision; None = on GPUs that support it, off on CPU.
    bf16: Optional[bool] = None


class ScalingConfig(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0.0)
    gpus_per_worker: float = Field(1.0, gt=0.0)
    #: Custom Ray resources each training worker reserves, e.g. ``{trainer_slot: 1}`` with one
    #: slot per node to place one worker per node, or ``{"accelerator_type:A100": 0.001}``.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)


class RunConfig(_Section):
    #: Local directory or ``s3://bucket/prefix`` for checkpoints and the exported model.
    storage_path: str = "runs"
    #: S3-compatible endpoint (MinIO, ...) for every s3:// path of the run, on every node;
    #: None = ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` or AWS itself. Never credentials:
    #: those come from the environment or the node's role only.
    s3_endpoint: Optional[str] = None
    #: How many checkpoints Ray Train keeps. 1 gives up the fallback: a damaged latest checkpoint
    #: then has no intact one before it to resume from (see RELIABILITY.md).
    checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=-1)
    #: Seconds a collective (torch all-reduce/barrier, Ray Train's report barrier) may wait for
    #: a peer before the run is taken as failed (then retried as run.max_failures allows); above
    #: the longest held-out evaluation (a rank's share of the encoding, then rank 0 scoring),
    #: which the ranks wait for. A worker that stops answering Ray's health check is failed
    #: after min(this, 600 s: Ray's default).
    hang_timeout_s: int = Field(1800, ge=5)
    #: Seconds an S3 operation that fails transiently (throttled, 5xx, connection refused or
    #: dropped: the endpoint down) is retried before the run fails with one line naming the URI.
    storage_retry_s: float = Field(30.0, ge=0)


class EvalConfig(_Section):
    langs: Optional[list[str]] = None
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(128, ge=4)
    with_context: bool = False


#: Task options that only mean something for some kinds.
KIND_OPTIONS = {
    "split": ("beir", "tydi", "afriqa"), "with_context": ("lareqa",), "distractors": ("tydi",),
    "corpus": ("afriqa",), "lang": ("beir",),
}


class EvalTaskConfig(_Section):
    """One task of an evaluation suite; options a kind does not use are errors."""

    #: Label of the task in the report (unique within the suite).
    name: str = Field(min_length=1)
    #: lareqa, tatoeba, tydi, afriqa or beir (as in ``hybridray eval --data KIND:DIR``).
    kind: Literal["lareqa", "tatoeba", "tydi", "afriqa", "beir"]
    #: Directory or s3:// prefix; relative paths are relative to the working directory.
    path: str = Field(min_length=1)
    #: Languages (lareqa, tydi: ISO 639-1 file names; tatoeba, afriqa: the files' ISO 639-3
    #: codes; beir: dataset sub-directories); None = every one found.
    langs: Optional[list[str]] = None
    #: beir: qrels split (default test); tydi: question split (dev); afriqa: file split (test).
    split: Optional[str] = None
    #: Max tokens per text for this task; None = the suite's max_length.
    max_length: Optional[int] = Field(None, ge=4)
    #: lareqa: encode candidates as sentence + paragraph (default false).
    with_context: Optional[bool] = None
    #: tydi: add each language's train/ passages to its corpus as distractors (default true).
    distractors: Optional[bool] = None
    #: afriqa: corpus = contexts of every file of the pivot language ("pivot", default) or of
    #: the question's own file ("file").
    corpus: Optional[Literal["pivot", "file"]] = None
    #: beir: language of the dataset(s) for the low/mid/high grouping; None = the
    #: sub-directory names (MIRACL-style per-language datasets).
    lang: Optional[str] = None

    @model_validator(mode="after")
    def _options_fit_kind(self) -> "EvalTaskConfig":
        for option, kinds in KIND_OPTIONS.items():
            if getattr(self, option) is not None and self.kind not in kinds:
                raise ValueError(f"{option} applies to kind {' / '.join(kinds)}, not {self.kind} (task {self.name!r})")
        return self


class EvalSuiteConfig(_Section):
    """Evaluation tasks run by one command: ``hybridray eval --suite FILE --model M --out DIR``."""

    #: Encoding batch size.
    batch_size: int = Field(64, ge=1)
    #: Max tokens per text (queries and passages); a task may set its own.
    max_length: int = Field(256, ge=4)
    #: Token pooling: mean (E5), cls (LaBSE) or last (decoder embedders); None = the model's
    #: own (its sentence-transformers files, else last for decoders, else mean).
    pooling: Optional[Literal["mean", "cls", "last"]] = None
    #: Prefixes put before queries / passages; None = the model's own (E5: "query: ").
    query_prefix: Optional[str] = None
    passage_prefix: Optional[str] = None
    #: Resource group of languages missing from (or placed differently than) Joshi et al.
    #: 2020's taxonomy, e.g. {"xx": "low"} (see hybridray/evaluate/languages.py).
    resource_groups: dict[str, Literal["low", "mid", "high"]] = Field(default_factory=dict)
    #: The tasks, run in this order.
    tasks: list[EvalTaskConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "EvalSuiteConfig":
        names = [t.name for t in self.tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"tasks: duplicate task name(s) {repeated}")
        return self


class _RepeatedKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int):
        super().__init__(f"line {line}: key {key!r} given twice")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping: plain YAML keeps the
    last copy, so ``sampler: {alpha: 0.9}`` followed by another ``sampler:`` would silently
    drop the 0.9. Merge keys (``<<: *base``) may still be overridden, as YAML means them."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: the base class names it
                    break
                if repeated:
                    raise _RepeatedKey(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str) -> Any:
    """The value of a YAML file; a missing file, bytes that are not UTF-8, text that is not
    YAML or a key given twice in one mapping is one UserError line naming the file (and the
    line, when YAML says)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return yaml.load(path.read_bytes().decode("utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 (byte {exc.start})") from None
    except _RepeatedKey as exc:
        raise UserError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{path}: invalid YAML: {where}{' '.join(str(problem).split())}") from None
    except RecursionError:
        raise UserError(f"{path}: invalid YAML: nested too deeply") from None


def load_suite(path: str | Path) -> EvalSuiteConfig:
    """Load and validate an evaluation suite YAML; errors name the file and the key."""
    path = Path(path)
    tree = read_yaml(path, "suite file")
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise UserError(f"{path}: top level must be a mapping with a 'tasks' list")
    try:
        return EvalSuiteConfig.model_validate(tree)
    except ValidationError as exc:
        raise UserError(f"{path}: {_describe(exc)}") from None


#: The longest run ``name`` (a sweep's trials add ``-<trial id>`` to it: see ``tuning.load_sweep``).
NAME_MAX_CHARS = 128


class Config(_Section):
    """A whole run: see ``configs/local.yaml`` for a documented example."""

    #: The run's directory under ``run.storage_path``: one plain path part (letters, digits,
    #: ``.``, ``_``, ``-``), so that no run can write outside the storage path.
    name: str = "hybrid"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("name")
    @classmethod
    def _one_path_part(cls, value: str) -> str:
        if not re.fullmatch(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX_CHARS - 1}}}", value):
            raise ValueError(
                f"{value!r} is not a plain directory name (letters, digits, '.', '_', '-'; no '/' "
                "and no leading '.'): a run's name must not point outside run.storage_path"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        sources = [("data.train", self.data.train, "data.hf", self.data.hf)] + [
            (f"data.extra_mono.{i}.path", e.path, f"data.extra_mono.{i}.hf", e.hf)
            for i, e in enumerate(self.data.extra_mono)
        ]
        for path_key, path, hf_key, hf in sources:
            if path.startswith("hf:") and not path[3:].strip():
                raise ValueError(f"{path_key}: hf: needs a dataset id or path, e.g. hf:org/name")
            if hf is not None and not path.startswith("hf:"):
                raise ValueError(f"{hf_key}: set, but {path_key} ({path}) is not an hf: source")
        if self.sampler.batch_size % self.scaling.num_workers:
            raise ValueError(
                f"sampler.batch_size ({self.sampler.batch_size}) must be a multiple of "
                f"scaling.num_workers ({self.scaling.num_workers})"
            )
        ds = self.deepspeed
        if ds.offload_param != "none" and ds.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage=3")
        if ds.offload_optimizer != "none" and ds.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage 1, 2 or 3")
        return self


#: Keys that change how a run is executed or logged, never what it computes: a run may be
#: resumed with other values. Everything else defines the run (see ``defining_values``).
#: ``data.train`` is a location; the shards' content is fingerprinted separately
#: (``hybridray.runs``), so moved shards still resume and changed shards do not.
OPERATIONAL_KEYS = frozenset({
    "name", "run.storage_path", "run.checkpoints_to_keep", "run.max_failures", "run.hang_timeout_s", "run.storage_retry_s",
    "train.log_every", "train.checkpoint_every", "train.eval_every", "train.eval_before",
    "scaling.cpus_per_worker", "scaling.gpus_per_worker", "scaling.resources_per_worker",
    "run.s3_endpoint", "data.task_cpus", "data.strict", "data.stream_chunk_steps",
    # memory levers: the same computation, laid out differently (the tests compare them).
    # Not loss.cache_chunk_size: it draws dropout masks chunk by chunk (other masks, another
    # trajectory), so it defines the run, like scaling.num_workers.
    "model.activation_checkpointing", "deepspeed.offload_optimizer", "deepspeed.offload_param",
    # a suite of extra evaluations after training: more reports, the same model
    "train.final_eval_suite",
    "data.train", "eval.batch_size",
})


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def default_values() -> dict[str, Any]:
    """Every dotted key of the schema with its default value."""
    return flatten(Config().model_dump(mode="json"))


def defining_values(config: "Config") -> dict[str, Any]:
    """The dotted keys and values that define what a run computes and differ from the
    schema's defaults (``OPERATIONAL_KEYS`` left out): two configs that agree here train the
    same model and write the same reports. Keys at their default are left out so that a new
    key, added at a default that keeps the old behaviour, does not set every earlier run apart."""
    defaults = default_values()
    return {
        k: v for k, v in flatten(config.model_dump(mode="json")).items()
        if not any(k == op or k.startswith(op + ".") for op in OPERATIONAL_KEYS) and defaults.get(k, _MISSING) != v
    }


_MISSING = object()


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key}")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``sampler.alpha=0.3`` -> ``("sampler.alpha", 0.3)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or not all(key.split(".")):
        raise UserError(f"override {text!r}: expected KEY=VALUE, e.g. sampler.alpha=0.5")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else ""
    except _RepeatedKey as exc:
        raise UserError(f"{key}: {exc.args[0].removeprefix('line 1: ')}") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{key}: cannot parse value {raw!r}: {' '.join(str(problem).split())}") from None
    except RecursionError:
        raise UserError(f"{key}: cannot parse value {raw[:40]!r}...: nested too deeply") from None
    return key, value


def _describe(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def build_config(tree: dict, overrides: list[str] = ()) -> Config:
    """Validate a config tree with dotted overrides applied; errors name the key."""
    tree = copy.deepcopy(tree or {})  # the caller's tree is never changed
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise UserError(_describe(exc)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Load a YAML run config and apply ``KEY=VALUE`` overrides."""
    path = Path(path)
    tree = read_yaml(path, "config file")
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise UserError(f"{path}: top level must be a mapping of sections")
    return build_config(tree, overrides)


def dump_config(config: Config) -> str:
    """The fully resolved config as YAML (written next to every run)."""
    return yaml.safe_dump(config.model_dump(), sort_keys=False)
