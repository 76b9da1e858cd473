"""Data-parallel training over several processes with MLX's own distributed layer (`mx.distributed`).

One process per GPU (NCCL on CUDA hosts, started by `mlx.launch`), per host (ring over TCP, `mlx.launch` with a
hostfile), or several on one CPU (ring over loopback, started here by `local_ring`, the cores split between them).
Every process builds the same model and walks the same `BatchOrder` (global batches, seeded as in a single
process); each takes every N-th example of each batch. Gradients are weighted by each process's share of the
batch's loss tokens and then averaged with `mlx.nn.average_gradients` (as mlx-lm's trainer does), so the update is
the gradient of the global batch's token-weighted mean loss: what one process computes on the whole batch, up to
float rounding. Rank 0 alone writes checkpoints, metrics and outputs; every rank resumes from the same checkpoint.

`launch_train` starts the worker processes from inside the train stage (`train.devices`); each runs
`python -m farense.train_worker JOB.json` (its rank's train stage).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import mlx.core as mx
from mlx.nn import average_gradients
from mlx.utils import tree_map

from farense.errors import ConfigError, TrainingError, TrainingInterrupted

if TYPE_CHECKING:
    from farense.config import FarenseConfig, TrainConfig

T = TypeVar("T")
REPORT_PREFIX = "@@farense-report "  # lines a worker prints for the launching process's reporter
RESULT_FILE = "distributed-summary.json"
BACKEND_ENV = "FARENSE_DISTRIBUTED_BACKEND"
LAUNCH_MAIN = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"
WORKER_MODULE = "farense.train_worker"  # each rank: `python -m farense.train_worker JOB.json`


# ---------------------------------------------------------------- inside a run


def world() -> mx.distributed.Group:
    """The global group: size 1 unless started by `mlx.launch` (or another launcher that sets MLX_RANK)."""
    return mx.distributed.init()


def launched() -> bool:
    """True inside a process that `mlx.launch` started (it exports MLX_RANK to every rank)."""
    return "MLX_RANK" in os.environ


def shard(indices: Sequence[T], rank: int, size: int) -> list[T]:
    """This rank's share of a global batch: every size-th example. Batches are sorted by length, so striding
    gives every rank a similar amount of padding and work."""
    return list(indices[rank::size])


def weight_by_tokens(loss: mx.array, ntoks: mx.array, grad: Any, group: mx.distributed.Group) -> tuple:
    """Turn this rank's (mean loss, loss tokens, gradient) into its part of the global batch's.

    Returns (global mean loss, global loss tokens, gradient scaled by size * ntoks / global ntoks), so that
    `average_gradients` of the scaled gradients is the gradient of the global token-weighted mean loss.
    """
    size = group.size()
    if size == 1:
        return loss, ntoks, grad
    n = ntoks.astype(mx.float32)
    total = mx.distributed.all_sum(n, group=group)
    global_loss = mx.distributed.all_sum(loss.astype(mx.float32) * n, group=group) / total
    w = size * n / total
    return global_loss, total.astype(ntoks.dtype), tree_map(lambda g: g * w.astype(g.dtype), grad)


def average(grad: Any, group: mx.distributed.Group) -> Any:
    """mlx's own gradient averaging (packs small arrays into few all-reduces); a no-op on one process."""
    return average_gradients(grad, group=group) if group.size() > 1 else grad


def sum_across(value: int, group: mx.distributed.Group) -> int:
    if group.size() == 1:
        return value
    return int(mx.distributed.all_sum(mx.array(value, mx.int64 if value > 2**31 else mx.int32), group=group).item())


# ---------------------------------------------------------------- how many processes, and starting them


def gpu_count() -> int:
    try:
        return mx.device_count(mx.gpu) if mx.cuda.is_available() else 1
    except (AttributeError, RuntimeError):
        return 1


# Processes `train.devices: auto` starts on a CPU without an accelerator. MLX's CPU backend runs elementwise work
# (exp, sigmoid, adds) on one thread while the matmuls use every core; two processes of half the cores each keep
# both cores of a 2-core machine busy: 200-210 tokens/s for the embedded model against 157-168 for one process.
CPU_PROCESSES = 2


def requested_processes(tcfg: TrainConfig) -> int:
    """Processes the config asks for: `train.devices`, or the number of entries in `train.hostfile`. auto: every
    CUDA GPU of this host; one on an Apple GPU; CPU_PROCESSES on a CPU of at least that many cores (never more
    than the batch has examples)."""
    if tcfg.hostfile is not None:
        return len(read_hostfile(Path(tcfg.hostfile)))
    if tcfg.devices != "auto":
        return int(tcfg.devices)
    if mx.cuda.is_available():
        return gpu_count()
    if mx.metal.is_available():
        return 1
    return max(1, min(CPU_PROCESSES, len(os.sched_getaffinity(0)), tcfg.batch_size))


def hostfile_backend(path: Path) -> str:
    data = json.loads(path.read_text())
    return data.get("backend", "") if isinstance(data, dict) else ""


def read_hostfile(path: Path) -> list[Any]:
    try:
        hosts = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: train.hostfile is not a readable JSON hostfile ({e})") from None
    hosts = hosts.get("hosts", hosts) if isinstance(hosts, dict) else hosts
    if not isinstance(hosts, list) or not hosts:
        raise ConfigError(f"{path}: train.hostfile must list hosts (the format of `mlx.distributed_config`)")
    return hosts


def backend() -> str:
    """NCCL between CUDA GPUs, ring (TCP) elsewhere; FARENSE_DISTRIBUTED_BACKEND overrides (e.g. jaccl, mpi)."""
    if os.environ.get(BACKEND_ENV):
        return os.environ[BACKEND_ENV]
    return "nccl" if mx.cuda.is_available() else "ring"


def _free_ports(count: int) -> int:
    """A base port with `count` consecutive free ports on this host (the ring backend uses one per rank)."""
    for _ in range(50):
        base = random.randint(20000, 60000 - count)
        try:
            socks = []
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free TCP ports for the distributed backend")


def launch_command(n: int, job: Path, tcfg: TrainConfig) -> list[str]:
    # mlx.launch's console script, or its module where MLX was installed without scripts (pip --target)
    script = Path(sys.executable).parent / "mlx.launch"
    launcher = [str(script)] if script.is_file() else [sys.executable, "-c", LAUNCH_MAIN]
    cmd = [*launcher, "--python", sys.executable]
    if tcfg.hostfile is None or not hostfile_backend(Path(tcfg.hostfile)) or os.environ.get(BACKEND_ENV):
        cmd += ["--backend", backend()]  # a hostfile's own "backend" wins otherwise
    if tcfg.hostfile is not None:
        cmd += ["--hostfile", str(tcfg.hostfile)]
    else:
        cmd += ["-n", str(n)]
    cmd += ["--starting-port", str(_free_ports(n)), "--nccl-port", str(_free_ports(1)), "--cwd", os.getcwd()]
    return cmd + ["--", "-m", WORKER_MODULE, str(job)]


def local_ring(n: int, work: Path) -> list[dict[str, str]]:
    """Each rank's environment for `n` ring processes on this host: what `mlx.launch -n N --backend ring` sets
    (MLX_RANK, MLX_HOSTFILE with one loopback port per rank), plus one OpenBLAS thread per core the rank gets."""
    base = _free_ports(n)
    hostfile = work / "ring-hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base + r}"] for r in range(n)]))
    env = {"MLX_HOSTFILE": str(hostfile)}
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        env["OPENBLAS_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // n))
    return [env | {"MLX_RANK": str(r)} for r in range(n)]


def uses_local_ring(tcfg: TrainConfig) -> bool:
    """Processes on this host over loopback, started here rather than by mlx.launch. mlx.launch (MLX 0.32) polls
    each rank's stdin, which is always writable, in a loop without a wait: on the 2-core CPU its threads took
    about one core away from the ranks (`top`), so 2 ranks trained at 106 tokens/s where one process gave 160."""
    return tcfg.hostfile is None and backend() == "ring"


def _stop(procs: list[subprocess.Popen], grace_s: float = 60.0, already_s: float = 0.0) -> None:
    """Ctrl-C every rank still running (rank 0 then saves a checkpoint), then kill what is left after grace_s.
    already_s: first give ranks that got the signal themselves (Ctrl-C in a terminal reaches the whole process
    group) that long to stop, so that a second one does not land while rank 0 writes its checkpoint."""
    end = time.monotonic() + already_s
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(end - time.monotonic(), 0.0))
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def default_sigint() -> None:
    """Popen's preexec_fn for a rank: Ctrl-C (SIGINT) back to its default. A process started in the background
    (`cmd &` in a script, nohup) ignores SIGINT, its children inherit that, and Python then installs no
    KeyboardInterrupt handler: `_stop` could not make rank 0 save its checkpoint, only kill it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_ranks(
    n: int, job: Path, work: Path, tcfg: TrainConfig, env: dict[str, str]
) -> tuple[list[subprocess.Popen], list[Any]]:
    """The worker processes, rank 0 (or mlx.launch) first with its output piped back as text, and the files that
    the other local ranks write their output (warnings, errors) to: they report nothing."""
    common = {"stderr": subprocess.STDOUT, "stdin": subprocess.DEVNULL, "preexec_fn": default_sigint}
    pipe = {**common, "stdout": subprocess.PIPE, "text": True}
    if not uses_local_ring(tcfg):
        return [subprocess.Popen(launch_command(n, job, tcfg), env=env, **pipe)], []
    worker = [sys.executable, "-m", WORKER_MODULE, str(job)]
    procs, logs = [], []
    for r, rank_env in enumerate(local_ring(n, work)):
        if r > 0:
            logs.append(open(work / f"rank-{r}.log", "w"))  # noqa: SIM115  (launch_train closes it)
        out = pipe if r == 0 else {**common, "stdout": logs[-1]}
        procs.append(subprocess.Popen(worker, env=env | rank_env, cwd=os.getcwd(), **out))
    return procs, logs


def launch_train(cfg: FarenseConfig, ctx: Any, n: int) -> dict[str, Any]:
    """Run the train stage as `n` data-parallel processes and return rank 0's summary.

    The job file carries the config and the stage's folders; workers report progress as prefixed JSON lines that
    are replayed here into `ctx.reporter`. The work folder (checkpoints) must be shared by all hosts."""
    work = Path(ctx.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    result = work / RESULT_FILE
    result.unlink(missing_ok=True)
    job = work / "distributed-job.json"
    job.write_text(json.dumps({
        "config": cfg.model_dump(mode="json"),
        "upstream": {k: str(v) for k, v in ctx.upstream.items()},
        "out_dir": str(ctx.out_dir),
        "work_dir": str(work),
        "result": str(result),
    }))  # fmt: skip
    ctx.reporter.log(f"train: {n} processes, {backend()} backend")
    mx.clear_cache()  # this process's cached GPU buffers would crowd the workers
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    procs, logs = start_ranks(n, job, work, cfg.train, env)
    tail: list[str] = []

    def watch(other: subprocess.Popen) -> None:  # a rank that failed leaves rank 0 waiting on it
        if other.wait() != 0:
            _stop(procs[:1])

    for p in procs[1:]:
        threading.Thread(target=watch, args=(p,), daemon=True).start()
    try:
        assert procs[0].stdout is not None
        for line in procs[0].stdout:
            line = line.rstrip("\n")
            if line.startswith(REPORT_PREFIX):
                msg = json.loads(line[len(REPORT_PREFIX) :])
                getattr(ctx.reporter, msg["method"])(*msg["args"])
            elif line.strip():
                tail = (tail + [line])[-20:]
        procs[0].wait()
        if procs[0].returncode != 0:  # a rank that failed first leaves the others waiting on it
            _stop(procs[1:], grace_s=5.0)
        for p in procs[1:]:
            p.wait()
    except BaseException as e:
        # Ctrl-C (mlx.launch forwards it to every rank), a cancelled flow run: rank 0 saves a checkpoint on the way out
        if len(procs) == 1:
            procs[0].terminate()
            procs[0].wait()
        else:
            _stop(procs, already_s=10.0 if isinstance(e, KeyboardInterrupt) else 0.0)
        raise
    finally:
        for f in logs:
            f.close()
    if not result.is_file():
        errors = sorted(work.glob("rank-*.error"))
        detail = "; ".join(e.read_text().strip() for e in errors) or "\n".join(tail[-10:])
        cls = TrainingInterrupted if errors and "interrupted" in detail else TrainingError
        raise cls(f"distributed training ({n} processes) failed: {detail}")
    return json.loads(result.read_text())
