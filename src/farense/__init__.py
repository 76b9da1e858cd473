"""farense: QLoRA fine-tuning of chat models with MLX, orchestrated by Prefect."""

from farense.blas import ensure_fast_blas

__version__ = "0.1.0"

# Must run before the first `import mlx.core` anywhere in the process.
ensure_fast_blas()
