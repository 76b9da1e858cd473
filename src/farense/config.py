"""The one typed configuration that travels from CLI / deployment parameters / UI form to every stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from farense.errors import ConfigError

Stage = Literal["data", "model", "train", "validate", "benchmark", "export"]
STAGES: tuple[Stage, ...] = ("data", "model", "train", "validate", "benchmark", "export")

# mlx-lm module names for the users' short target names.
LORA_TARGET_MODULES: dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class DataConfig(Section):
    path: Path = Field(Path("data/farense"), description="A JSONL file or a folder of JSONL files")
    valid_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of examples in the validation split")
    seed: int = Field(42, description="Seed of the content-stable split")
    max_line_bytes: int = Field(1_000_000, gt=0, description="Longer lines are rejected")
    dev_questions: Path = Field(
        Path("data/eval/dev.jsonl"),
        validation_alias=AliasChoices("dev_questions", "eval_questions"),
        description="Dev questions: every choice is made on them (recipes, checkpoints, the publish gate)",
    )
    test_questions: Path = Field(
        Path("data/eval/test.jsonl"),
        description="The sealed test set: answered and reported by the validate stage, never used to choose anything",
    )
    facts: Path | None = Field(
        None,
        description="Grounded answers (opt-in): a text file of facts, one a line, appended to every example's system "
        "prompt and so to every question the model is asked (src/farense/grounding.py; configs/grounded.yaml)",
    )


class ModelConfig(Section):
    source: str = Field(
        "embedded:smollm2",
        description="HF repo id, local HF folder, MLX folder, GGUF file, or embedded:smollm2",
    )
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch) for a repo id")
    bits: int = Field(4, description="Quantization bits of the base model")
    group_size: int = Field(64, description="Quantization group size (GGUF sources keep their own)")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in (2, 3, 4, 5, 6, 8):
            raise ValueError("bits must be one of 2, 3, 4, 5, 6, 8")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v not in (32, 64, 128):
            raise ValueError("group_size must be 32, 64 or 128")
        return v


ComputePath = Literal["auto", "quantized", "dequantized", "recompute"]


class TrainConfig(Section):
    batch_size: int = Field(4, ge=1)
    grad_accumulation: int = Field(2, ge=1, description="Micro-batches per optimizer step")
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up, in optimizer steps, then the decay (lr_decay)")
    lr_decay: Literal["cosine", "linear"] = Field("cosine", description="Decay after the warm-up")
    final_lr_fraction: float = Field(0.1, ge=0, le=1, description="The decay's end, as a fraction of the peak")
    schedule_steps: int | None = Field(
        None, ge=1, description="Length of the warm-up and decay schedule in optimizer steps; null: the run's steps. "
        "Longer than the run, the run ends partway down the decay, at a higher learning rate"
    )
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="AdamW's second-moment decay")
    adam_bias_correction: bool = Field(
        False, description="AdamW's bias correction of its moments (mlx's default: off, which multiplies the early "
        "steps' learning rate: about 4.5x at step 50 and 1.9x at step 332 with beta2 0.999)"
    )
    max_seq_length: int = Field(512, ge=8)
    max_grad_norm: float | None = Field(
        None, gt=0, description="Clip the gradient's global norm to this before each optimizer step; null: no clipping"
    )
    fine_tune_type: Literal["lora", "full"] = Field(
        "lora", description="lora: adapters over the frozen base (QLoRA); full: every weight of the dequantized base "
        "is trained and saved (a measurement option for small models on a CPU: the adapter file holds the whole "
        "model in float32 and loads only over a dequantized base)"
    )
    lora_rank: int = Field(8, ge=1)
    lora_scale: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] = Field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    lora_layers: int = Field(-1, description="How many of the last layers get adapters; -1 for all")
    mask_prompt: bool = Field(True, description="Train on the answers only")
    grad_checkpoint: bool = False
    save_every: int = Field(200, ge=1, description="Checkpoint every N optimizer steps")
    eval_every: int = Field(200, ge=1, description="Validate every N optimizer steps")
    log_every: int = Field(10, ge=1, description="Report train loss every N optimizer steps")
    max_eval_batches: int = Field(-1, description="-1 for the whole validation split")
    keep_checkpoints: int = Field(3, ge=1, description="Keep the last K checkpoints (and the best)")
    seed: int = 0
    compute_path: ComputePath = Field("auto", description="auto: quantized on Apple GPU, dequantized on CPU")
    auto_fit_memory: bool = Field(True, description="Lower batch and raise accumulation when memory would not fit")
    masked_lm_head: bool = Field(
        True, description="Project onto the vocabulary only at trained (unmasked) positions; same loss, less work"
    )
    fast_math: bool = Field(
        True, description="CPU: train with farense.fast_math's SwiGLU and cross-entropy (their exp is vectorized): "
        "the train stage with two processes ran at 218 and 216 against 196 and 203 tokens/s here with the SwiGLU, "
        "and 230 against 213 with the cross-entropy too; their rounding differs by about 1e-7, so false gives "
        "another adapter"
    )
    low_memory: bool = Field(
        False, description="recompute path (CUDA): the backward pass also recomputes each MLP's SwiGLU output and "
        "each block's norm outputs instead of keeping them: a Mistral-7B step at 4 x 512 on an H200 peaked at 13.66 "
        "instead of 16.42 GB and ran 8% slower (12,135 against 13,143 tokens/s)"
    )
    devices: Literal["auto"] | int = Field(
        1, description="Data-parallel processes (auto: every CUDA GPU of this host; 1 on an Apple GPU; 2 on a CPU "
        "of 2 or more cores, with the cores split between them); see farense.distributed"
    )
    hostfile: Path | None = Field(
        None, description="mlx.launch hostfile (JSON) to train across hosts; the artifacts folder must be shared"
    )

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: str | int) -> str | int:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be 'auto' or a number of processes >= 1")
        return v

    @field_validator("lora_targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in LORA_TARGET_MODULES]
        if bad or not v:
            raise ValueError(f"unknown LoRA target(s) {bad}; choose from {sorted(LORA_TARGET_MODULES)}")
        return v


class EvalConfig(Section):
    max_tokens: int = Field(64, ge=1, description="Greedy answer length for held-out questions")
    max_questions: int = Field(-1, description="-1 for all held-out questions")
    max_batches: int = Field(-1, description="Validation batches for loss/perplexity; -1 for all")
    batch_size: int = Field(
        16, ge=1, description="Held-out questions answered together (greedy; 1 answers one at a time)"
    )
    adapter: Literal["best", "final"] = Field(
        "best", description="Adapter to validate and export: lowest validation loss (best) or last step (final)"
    )


BenchmarkMode = Literal["lora", "qlora-recompute", "qlora-native"]


class BenchmarkConfig(Section):
    enabled: bool = True
    train_modes: list[BenchmarkMode] = Field(
        default_factory=lambda: ["lora", "qlora-recompute", "qlora-native"],
        description="lora: dense (dequantized) base; qlora-recompute: 4-bit base dequantized per matmul; "
        "qlora-native: MLX's quantized matmul (about 20x slower on CPU: see native_train_steps)",
    )
    train_steps: int = Field(6, ge=1, description="Timed optimizer steps per mode")
    warmup_steps: int = Field(2, ge=0, description="Untimed steps before them (compilation, first allocations)")
    native_train_steps: int = Field(
        1, ge=0, description="Timed steps for qlora-native on CPU (on a GPU it runs like the other modes); 0 skips it"
    )
    native_max_seq_length: int = Field(
        64, ge=8, description="qlora-native runs one example of at most this many tokens per step (it is slow on CPU)"
    )
    batch_size: int = Field(2, ge=1, description="Micro-batch of the timed runs (no accumulation)")
    max_seq_length: int = Field(256, ge=8, description="Truncation of the timed runs' examples")
    generation_tokens: int = Field(32, ge=1, description="Tokens generated per timed generation run")
    native_generation: bool = Field(
        False, description="Also time generation on the 4-bit quantized path mlx_lm.server runs (minutes on CPU)"
    )
    measure_dense_size: bool = Field(True, description="Save a dequantized base to scratch space to measure it")


class ExportConfig(Section):
    fuse: bool = Field(False, description="Also write a fused model with mlx-lm's fuse")
    fuse_dequantize: bool = Field(False, description="Fuse into a dense model (fast CPU serving, 4-8x the size)")
    publish: bool = Field(True, description="Point artifacts/published/latest at this export when it passes the gate")
    quality_gate: bool = Field(True, description="Publish only when the tuned model beats its base and the published one")
    gate_fact_tolerance: float = Field(
        0.0, ge=0, le=1, description="How far fact accuracy may fall below the published adapter's and still publish"
    )
    gate_f1_tolerance: float = Field(
        0.0, ge=0, description="The same for Q&A F1, used when the held-out questions list no key facts"
    )
    gate_loss_tolerance: float = Field(
        0.0, ge=0, description="How far the validation loss may rise above the published adapter's and still publish"
    )


class FarenseConfig(Section):
    artifacts_dir: Path = Field(Path("artifacts"), description="Where every stage writes")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    def section(self, name: str) -> dict[str, Any]:
        return getattr(self, name).model_dump(mode="json")

    def resolve_paths(self, root: Path) -> "FarenseConfig":
        """Make relative paths absolute against `root` (the project or config file folder)."""
        cfg = self.model_copy(deep=True)
        cfg.artifacts_dir = _absolute(cfg.artifacts_dir, root)
        cfg.data.path = _absolute(cfg.data.path, root)
        cfg.data.dev_questions = _absolute(cfg.data.dev_questions, root)
        cfg.data.test_questions = _absolute(cfg.data.test_questions, root)
        cfg.data.facts = None if cfg.data.facts is None else _absolute(cfg.data.facts, root)
        if _looks_like_path(cfg.model.source) and not Path(cfg.model.source).is_absolute():
            candidate = root / cfg.model.source
            if candidate.exists():
                cfg.model.source = str(candidate)
        return cfg


def _absolute(p: Path, root: Path) -> Path:
    return p if p.is_absolute() else (root / p).resolve()


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith(".gguf")


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `farense config show` lists every field)"
        lines.append(f"{origin}: field '{field}': {msg}")
    return "\n".join(lines)


DEFAULT_CONFIG_FILE = Path("farense.yaml")


def config_file_or_default(path: Path | None) -> Path | None:
    """The config file to read: the one given, else ./farense.yaml when it exists, else none (defaults)."""
    if path is not None:
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_config(
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    root: Path | None = None,
) -> FarenseConfig:
    """Build the config from defaults, an optional YAML file, then dotted overrides (`train.epochs=1`)."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        raw = loaded
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    try:
        cfg = FarenseConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin if not overrides else f"{origin} + overrides")) from None
    # Relative paths mean the folder farense runs in (the project root; deployments start there too), not the
    # config file's folder, so `--config configs/x.yaml` keeps data/farense and artifacts where they are.
    return cfg.resolve_paths((root or Path.cwd()).resolve())


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.epochs=1` -> ("train.epochs", 1); the value is read as YAML so numbers and lists work."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected section.field=value, e.g. train.epochs=1")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


# --- deployment parameters: the file plus typed overrides --------------------------------------------------------


def _overrides_model(model: type[BaseModel], name: str) -> type[BaseModel]:
    """`model` with every field optional and None by default: the UI form shows each typed field, empty, and
    only what the user fills in overrides the config file."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            annotation = _overrides_model(annotation, annotation.__name__.removesuffix("Config") + "Overrides")
        elif info.metadata:  # the bounds (ge=1, gt=0, ...) still checked by the server before a run
            annotation = Annotated[(annotation, *info.metadata)]
        fields[field_name] = (Optional[annotation], Field(None, description=info.description))
    return create_model(name, __base__=Section, **fields)


FarenseConfigOverrides = _overrides_model(FarenseConfig, "FarenseConfigOverrides")


def dotted_overrides(overrides: BaseModel | dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 1}} -> {"train.epochs": 1}; fields left empty (None) are not overrides."""
    if isinstance(overrides, BaseModel):
        overrides = overrides.model_dump(mode="json", exclude_none=True)
    out: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            out.update(dotted_overrides(value, f"{prefix}{key}."))
        elif value is not None:
            out[f"{prefix}{key}"] = value
    return out


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """{"train.epochs": 1} -> {"train": {"epochs": 1}}: `--set` overrides as a flow's `config` parameter."""
    raw: dict[str, Any] = {}
    for key, value in dotted.items():
        _set_dotted(raw, key, value)
    return raw


def config_from_parameters(
    config_file: str | None, overrides: BaseModel | dict[str, Any] | None
) -> tuple[FarenseConfig, Path | None, dict[str, Any]]:
    """What a flow run uses: the config file (./farense.yaml when none is named, as `farense run` does) with the
    run's overrides on top. Returns the config, the file read and the overrides applied."""
    path = config_file_or_default(Path(config_file) if config_file else None)
    dotted = dotted_overrides(overrides)
    return load_config(path, dotted), path, dotted
