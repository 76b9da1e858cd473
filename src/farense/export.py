"""Export stage and publishing.

The export stage writes `artifacts/export/<key>/`: the validated adapter in mlx-lm's layout (so
`mlx_lm.generate --model <base> --adapter-path <dir>` works), `metadata.json` (config, data and base model hashes,
metrics, package versions, compute path, training summary) and optionally a fused model.

Publishing happens after the store has committed that folder (`publish`, called by `stages.execute_stage`): the
adapter is copied to `artifacts/published/versions/<name>/` and only then is the `artifacts/published/latest`
symlink switched to it with one atomic rename. A reader resolves `latest` once and reads a complete version; old
versions stay for rollback. The quality gate decides whether to switch: the tuned adapter must beat its base on
validation loss and must not score worse than the adapter published now.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from farense import __version__
from farense.config import ExportConfig, FarenseConfig
from farense.errors import FarenseError
from farense.evaluate import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_FILE, METRICS_FILE
from farense.jsonl import read_jsonl
from farense.answer_draft import DraftCorpus, draft_corpus
from farense.progress import NullReporter, Reporter
from farense.store import ArtifactStore, hash_json, sha256_file

METADATA_FILE = "metadata.json"
DRAFT_CORPUS = "draft_corpus.json"  # the training answers and their questions, for farense.answer_draft
FUSED_DIR = "fused"
PUBLISHED_DIR = "published"
LATEST = "latest"
VERSIONS = "versions"
HISTORY = "history.jsonl"
PACKAGES = ("farense", "mlx", "mlx-lm", "mlx-metal", "mlx-cpu", "mlx-cuda", "transformers", "tokenizers",
            "safetensors", "numpy", "prefect")  # fmt: skip


# ---------------------------------------------------------------- the stage


def export_stage(cfg: FarenseConfig, ctx: Any) -> dict[str, Any]:
    """Write the validated adapter, its metadata and (optionally) a fused model; judge it against the gate."""
    model_dir, train_dir, valid_dir = (Path(ctx.upstream[s]) for s in ("model", "train", "validate"))
    bench_dir = ctx.upstream.get("benchmark")
    out, reporter = Path(ctx.out_dir), ctx.reporter

    for name in (ADAPTER_FILE, ADAPTER_CONFIG):
        shutil.copyfile(valid_dir / ADAPTER_DIR / name, out / name)
    meta = export_metadata(cfg, model_dir, train_dir, valid_dir, Path(bench_dir) if bench_dir else None, out)
    data_dir = Path(meta["data"]["path"]) if meta["data"].get("path") else None
    if data_dir is not None and (data_dir / "train.jsonl").is_file():
        corpus = draft_corpus(read_jsonl(data_dir / "train.jsonl"))
        (out / DRAFT_CORPUS).write_text(json.dumps(corpus.to_json(), ensure_ascii=False))
    if cfg.export.fuse:
        meta["fused"] = fuse_model(model_dir, out, out / FUSED_DIR, cfg.export.fuse_dequantize)
        reporter.log(f"export: fused model written to {out / FUSED_DIR} ({meta['fused']['bytes'] / 1e6:.1f} MB)")

    current = read_published(cfg.artifacts_dir)
    decision = quality_gate(meta, current, cfg.export)
    meta["gate_at_export"] = asdict(decision)
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=str))
    reporter.log(f"export: quality gate (against the adapter published now): {decision.message()}")
    return {
        "adapter_sha256": meta["adapter"]["sha256"],
        "adapter_bytes": meta["adapter"]["bytes"],
        "base_val_loss": meta["metrics"]["base"]["val_loss"],
        "tuned_val_loss": meta["metrics"]["tuned"]["val_loss"],
        "tuned_qa_f1": meta["metrics"]["tuned"]["qa_f1"],
        "tuned_fact_accuracy": meta["metrics"]["tuned"].get("fact_accuracy"),
        "compute_path": meta["compute_path"],
        "fused": bool(cfg.export.fuse),
        "gate": asdict(decision),
        "mlx_lm_generate": meta["usage"]["generate"],
    }


def export_metadata(
    cfg: FarenseConfig, model_dir: Path, train_dir: Path, valid_dir: Path, bench_dir: Path | None, out: Path
) -> dict[str, Any]:
    store = ArtifactStore(cfg.artifacts_dir)
    train_manifest = _manifest(train_dir)
    model_manifest = _manifest(model_dir)
    data_key = train_manifest.get("inputs", {}).get("data")
    data_record = store.get("data", data_key) if data_key else None
    metrics = json.loads((valid_dir / METRICS_FILE).read_text())
    adapter_config = json.loads((out / ADAPTER_CONFIG).read_text())
    return {
        "farense_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cfg.model_dump(mode="json"),
        "config_sha256": hash_json(cfg.model_dump(mode="json")),
        "data": {
            "stage_key": data_key,
            "path": str(data_record.path.resolve()) if data_record else None,
            "dataset_sha256": data_record.manifest["inputs"].get("dataset") if data_record else None,
            "stats": data_record.manifest.get("summary") if data_record else None,
            "valid_sha256": metrics.get("valid_sha256"),
            "questions_sha256": metrics.get("questions_sha256"),
        },
        "base_model": {
            "source": cfg.model.source,
            "revision": cfg.model.revision,
            "identity": model_manifest.get("inputs", {}).get("source"),
            "stage_key": train_manifest.get("inputs", {}).get("model"),
            "path": str(model_dir.resolve()),
            "weights_sha256": weights_sha256(model_dir),
            "weights_bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
        },
        "adapter": {
            **metrics["adapter"],
            "fine_tune_type": adapter_config.get("fine_tune_type"),
            "num_layers": adapter_config.get("num_layers"),
            "lora_parameters": adapter_config.get("lora_parameters"),
        },
        "metrics": {k: metrics[k] for k in ("base", "tuned", "delta", "tuned_beats_base", "questions", "max_tokens")}
        | {"valid_sha256": metrics.get("valid_sha256"), "questions_sha256": metrics.get("questions_sha256")},
        "system_prompt": metrics.get("system_prompt"),
        "compute_path": train_manifest.get("summary", {}).get("compute_path") or metrics["compute"]["compute_path"],
        "train": train_manifest.get("summary", {}),
        "benchmark": _manifest(bench_dir).get("summary") if bench_dir else None,
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "usage": {
            "generate": f"python -m mlx_lm generate --model {model_dir.resolve()} --adapter-path <this folder> "
            '--prompt "Quem foi Hassan Nader?"',
            "server": f"python -m mlx_lm server --model {model_dir.resolve()} --adapter-path <this folder>",
        },
    }


def weights_sha256(model_dir: Path) -> str:
    """Hash of the model's weight files only (the folder also holds run bookkeeping that changes per build)."""
    return hash_json({f.name: sha256_file(f) for f in sorted(Path(model_dir).glob("*.safetensors"))})


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):
            out[name] = importlib_metadata.version(name)
    return out


def fuse_model(model_dir: Path, adapter_dir: Path, dest: Path, dequantize: bool) -> dict[str, Any]:
    """mlx-lm's own fuse, as its command line runs it."""
    args = [sys.executable, "-m", "mlx_lm", "fuse", "--model", str(model_dir), "--adapter-path", str(adapter_dir),
            "--save-path", str(dest)] + (["--dequantize"] if dequantize else [])  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise FarenseError(f"mlx_lm fuse failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return {"path": FUSED_DIR, "dequantized": dequantize, "bytes": sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())}


def _manifest(folder: Path | None) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, TypeError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------- the quality gate


@dataclass
class GateDecision:
    publish: bool
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)

    def message(self) -> str:
        return ("publish: " if self.publish else "keep the published adapter: ") + "; ".join(self.reasons)


def quality_gate(candidate: dict[str, Any], current: dict[str, Any] | None, ecfg: ExportConfig) -> GateDecision:
    """Whether `candidate` (export metadata) may replace `current` (the published version's metadata, or None).

    Metrics are compared only where they were measured on the same thing: Q&A F1 on the same question set with
    the same answer length, validation loss on the same validation split over the same base weights. When nothing
    can be compared the current adapter is kept: a worse model must never replace a good one unnoticed.
    """
    if not ecfg.quality_gate:
        return GateDecision(True, ["export.quality_gate is off"])
    m = candidate["metrics"]
    base_loss, tuned_loss = m["base"]["val_loss"], m["tuned"]["val_loss"]
    checks: dict[str, Any] = {"base_val_loss": base_loss, "tuned_val_loss": tuned_loss}
    if not tuned_loss < base_loss:
        return GateDecision(False, [f"tuned validation loss {tuned_loss:.4f} does not beat the base's {base_loss:.4f}"],
                            checks)  # fmt: skip
    reasons = [f"tuned validation loss {tuned_loss:.4f} beats the base's {base_loss:.4f}"]
    base_acc, tuned_acc = m["base"].get("fact_accuracy"), m["tuned"].get("fact_accuracy")
    if base_acc is not None and tuned_acc is not None:
        checks |= {"base_fact_accuracy": base_acc, "tuned_fact_accuracy": tuned_acc}
        if tuned_acc < base_acc:
            return GateDecision(False, reasons + [f"tuned fact accuracy {tuned_acc:.4f} is below the base's {base_acc:.4f}"],
                                checks)  # fmt: skip
        reasons.append(f"tuned fact accuracy {tuned_acc:.4f} >= the base's {base_acc:.4f}")
    if current is None:
        return GateDecision(True, reasons + ["nothing is published yet"], checks)
    cm = current["metrics"]
    name = current.get("published", {}).get("version", "the published adapter")
    compared = False
    # The dev set's scores, and only where the same questions were scored the same way (the sealed test set's
    # figures, test_* in the metrics, are never read here).
    if m.get("questions_sha256") and all(m.get(k) == cm.get(k) for k in ("questions_sha256", "max_tokens", "scorer")):
        compared = True
        # Fact accuracy when the questions list key facts; token F1 for question sets that only have references.
        metric, label, tolerance = (
            ("fact_accuracy", "fact accuracy", ecfg.gate_fact_tolerance)
            if m["tuned"].get("fact_accuracy") is not None and cm["tuned"].get("fact_accuracy") is not None
            else ("qa_f1", "Q&A F1", ecfg.gate_f1_tolerance)
        )
        value, cur_value = m["tuned"][metric], cm["tuned"][metric]
        checks |= {metric: value, f"published_{metric}": cur_value}
        if value < cur_value - tolerance:
            return GateDecision(False, [f"held-out {label} {value:.4f} is below {name}'s {cur_value:.4f}"
                                        + (f" by more than {tolerance}" if tolerance else "")],
                                checks)  # fmt: skip
        reasons.append(f"held-out {label} {value:.4f} >= {name}'s {cur_value:.4f}" + (f" - {tolerance}" if tolerance else ""))
    else:
        reasons.append("dev scores not comparable with the published adapter (other question set, answer length or scorer)")
    if m.get("valid_sha256") == cm.get("valid_sha256") and _same_base(candidate, current):
        compared = True
        cur_loss = cm["tuned"]["val_loss"]
        checks |= {"published_val_loss": cur_loss}
        if tuned_loss > cur_loss + ecfg.gate_loss_tolerance:
            return GateDecision(False, [f"validation loss {tuned_loss:.4f} is above {name}'s {cur_loss:.4f}"], checks)
        reasons.append(f"validation loss {tuned_loss:.4f} <= {name}'s {cur_loss:.4f}")
    else:
        reasons.append("validation loss not comparable with the published adapter (other split or base model)")
    if not compared:
        return GateDecision(False, reasons + [
            "nothing could be compared with the published adapter, so it stays; to replace it anyway run once "
            "with export.quality_gate=false"], checks)  # fmt: skip
    return GateDecision(True, reasons, checks)


def _same_adapter(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["adapter"]["sha256"] == b["adapter"]["sha256"] and _same_base(a, b)


def _same_base(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["base_model"].get("weights_sha256") == b["base_model"].get("weights_sha256")


# ---------------------------------------------------------------- publishing


def published_root(artifacts_dir: Path) -> Path:
    return Path(artifacts_dir) / PUBLISHED_DIR


def published_version(artifacts_dir: Path) -> Path | None:
    """The folder `latest` points to, resolved once (read every file from it, not through `latest`)."""
    latest = published_root(artifacts_dir) / LATEST
    if not latest.is_symlink() and not latest.exists():
        return None
    target = latest.resolve()
    return target if (target / METADATA_FILE).is_file() else None


def read_draft_corpus(version: Path) -> DraftCorpus:
    """The training answers (and their questions) a published version carries for the draft; empty for versions
    without (older versions carry answers only)."""
    path = Path(version) / DRAFT_CORPUS
    return DraftCorpus.from_json(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else DraftCorpus()


def read_published(artifacts_dir: Path) -> dict[str, Any] | None:
    version = published_version(artifacts_dir)
    if version is None:
        return None
    return json.loads((version / METADATA_FILE).read_text())


@contextlib.contextmanager
def _publish_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def publish(cfg: FarenseConfig, export_dir: Path, reporter: Reporter | None = None) -> dict[str, Any]:
    """Publish a committed export folder if the quality gate lets it replace the current adapter.

    Idempotent and safe to call for a cached export: the gate is judged now, against what is published now.
    Returns the decision, which is also appended to `published/history.jsonl` and logged.
    """
    rep = reporter or NullReporter()
    export_dir = Path(export_dir)
    root = published_root(cfg.artifacts_dir)
    if not cfg.export.publish:
        return {"published": False, "reasons": ["export.publish is false"]}
    with _publish_lock(root):
        candidate = json.loads((export_dir / METADATA_FILE).read_text())
        current = read_published(cfg.artifacts_dir)
        if current is not None and _same_adapter(candidate, current):
            name = current["published"]["version"]
            rep.log(f"publish: this adapter is already published as {name}")
            return {"published": False, "publish": False, "version": name, "reasons": ["already published"]}
        decision = quality_gate(candidate, current, cfg.export)
        record: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "export": str(export_dir),
            "adapter_sha256": candidate["adapter"]["sha256"],
            "previous": (current or {}).get("published", {}).get("version"),
            **asdict(decision),
        }
        if decision.publish:
            version = _copy_version(root, export_dir, candidate, record)
            _switch_latest(root, version)
            record["version"] = version.name
        with open(root / HISTORY, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    rep.log(f"publish: {decision.message()}" + (f" -> {root / LATEST} = {record['version']}" if decision.publish else ""))
    rep.markdown("publish-decision", _decision_markdown(record), "Quality gate and publishing decision")
    return {"published": decision.publish, **record}


def _copy_version(root: Path, export_dir: Path, meta: dict[str, Any], record: dict[str, Any]) -> Path:
    versions = root / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{export_dir.name}"
    final = versions / name
    n = 1
    while final.exists():
        n += 1
        final = versions / f"{name}-{n}"
    tmp = versions / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for f in (ADAPTER_FILE, ADAPTER_CONFIG):
            shutil.copyfile(export_dir / f, tmp / f)
        if (export_dir / DRAFT_CORPUS).is_file():  # exports made before it existed have none
            shutil.copyfile(export_dir / DRAFT_CORPUS, tmp / DRAFT_CORPUS)
        meta = meta | {"published": {"version": final.name, "export_dir": str(export_dir), "decision": record}}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=str))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _switch_latest(root: Path, version: Path) -> None:
    """Point `latest` at `version` with one rename: readers see the old version or the new one, never neither."""
    tmp_link = root / f".latest-{os.getpid()}-{time.monotonic_ns()}"
    os.symlink(Path(VERSIONS) / version.name, tmp_link)
    os.replace(tmp_link, root / LATEST)
    with contextlib.suppress(OSError):  # make the rename durable where the filesystem allows it
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _decision_markdown(record: dict[str, Any]) -> str:
    head = f"**{'Published' if record['publish'] else 'Not published'}**" + (
        f" as `{record.get('version')}`" if record["publish"] else f"; `latest` stays `{record.get('previous')}`"
    )
    return "\n".join([head, "", *(f"- {r}" for r in record["reasons"])]) + "\n"
