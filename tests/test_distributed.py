"""Data-parallel training on the CPU: 2 processes with MLX's ring backend over loopback, started by the train stage
itself (`farense.distributed.local_ring`); `mlx.launch` for hostfiles and NCCL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import farense  # noqa: F401
import mlx.core as mx
import pytest

from farense.distributed import _stop, default_sigint, launch_command, local_ring, shard, uses_local_ring
from farense.config import load_config
from farense.train import read_metrics
from test_train import ROOT, max_abs_diff, metric_rows, run_train, tiny_inputs, write_split  # noqa: F401

TWO = {"train.devices": 2, "train.batch_size": 4, "train.grad_accumulation": 1}

# Rank r of 2 (or a single process when not launched) computes the gradient of one global batch of 4 examples of
# different lengths through the trainer's code path; each writes what it got.
GRAD_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{src!r}]
    import farense
    import mlx.core as mx, mlx.nn as nn
    from mlx.utils import tree_flatten
    from pathlib import Path
    from farense import distributed
    from farense.config import load_config
    from farense.jsonl import read_jsonl
    from farense.train import BatchOrder, collate, drop_unlearnable, load_for_training, loss_fn, tokenize_rows
    cfg = load_config(None, {{"train.compute_path": "dequantized", "train.lora_dropout": 0.0}})
    mx.random.seed(0)
    model, tok, _ = load_for_training(Path({model!r}), cfg.train)
    rows = tokenize_rows(read_jsonl(Path({data!r}) / "train.jsonl"), tok, True)
    examples, _ = drop_unlearnable(rows, 256)
    idx = BatchOrder(examples, 4, 0).batch_at(1)[2]
    group = distributed.world()
    mine = distributed.shard(idx, group.rank(), group.size())
    (loss, ntoks), grad = nn.value_and_grad(model, loss_fn)(model, *collate(examples, mine, 256))
    loss, ntoks, grad = distributed.weight_by_tokens(loss, ntoks, grad, group)
    grad = distributed.average(grad, group)
    out = Path(sys.argv[1]) / f"rank{{group.rank()}}-of-{{group.size()}}"
    mx.save_safetensors(str(out) + ".safetensors", dict(tree_flatten(grad)))
    Path(str(out) + ".json").write_text(json.dumps({{"loss": loss.item(), "ntoks": ntoks.item(), "shard": mine}}))
""")


def test_shard_takes_every_nth_example() -> None:
    assert shard([5, 6, 7, 8, 9], 0, 2) == [5, 7, 9] and shard([5, 6, 7, 8, 9], 1, 2) == [6, 8]
    assert sorted(shard(range(7), 0, 3) + shard(range(7), 1, 3) + shard(range(7), 2, 3)) == list(range(7))


def test_launch_uses_mlx_launch_with_one_process_per_device(tmp_path: Path) -> None:
    cmd = launch_command(2, tmp_path / "job.json", load_config(None, TWO).train)
    assert "mlx.launch" in cmd[0] or "mlx._distributed_utils.launch" in cmd[2]
    assert cmd[cmd.index("-n") + 1] == "2"
    assert cmd[cmd.index("--backend") + 1] == ("nccl" if mx.cuda.is_available() else "ring")
    assert cmd[-3:] == ["-m", "farense.train_worker", str(tmp_path / "job.json")]


def test_a_hostfile_sets_the_processes_and_its_backend(tmp_path: Path) -> None:
    from farense.distributed import requested_processes
    from farense.errors import ConfigError

    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps({"backend": "ring", "hosts": [{"ssh": "a", "ips": ["10.0.0.1"]},
                                                              {"ssh": "b", "ips": ["10.0.0.2"]},
                                                              {"ssh": "c", "ips": ["10.0.0.3"]}]}))  # fmt: skip
    tcfg = load_config(None, {"train.hostfile": str(hosts)}).train
    assert requested_processes(tcfg) == 3
    cmd = launch_command(3, tmp_path / "job.json", tcfg)
    assert cmd[cmd.index("--hostfile") + 1] == str(hosts) and "--backend" not in cmd and "-n" not in cmd
    hosts.write_text("[not json")
    with pytest.raises(ConfigError, match="hosts.json"):
        requested_processes(tcfg)


def test_two_process_gradients_equal_one_process_on_the_global_batch(
    tiny_inputs: dict[str, Path], tmp_path: Path  # noqa: F811
) -> None:
    script = tmp_path / "grad.py"
    script.write_text(GRAD_SCRIPT.format(src=str(ROOT / "src"), model=str(tiny_inputs["model"]),
                                         data=str(tiny_inputs["data"])))  # fmt: skip
    single = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    cmd = launch_command(2, script, load_config(None, TWO).train)
    cmd = cmd[: cmd.index("--")] + ["--", str(script), str(tmp_path)]
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert (tmp_path / "rank1-of-2.json").is_file(), two.stdout + two.stderr

    ref, ref_info = mx.load(str(tmp_path / "rank0-of-1.safetensors")), json.loads((tmp_path / "rank0-of-1.json").read_text())
    r0, r1 = (json.loads((tmp_path / f"rank{r}-of-2.json").read_text()) for r in (0, 1))
    # Each rank saw half the batch, of different token counts; together the whole batch.
    assert sorted(r0["shard"] + r1["shard"]) == sorted(ref_info["shard"]) and r0["shard"] != r1["shard"]
    assert r0["ntoks"] == r1["ntoks"] == ref_info["ntoks"]
    assert r0["loss"] == pytest.approx(ref_info["loss"], rel=1e-5)
    for r in (0, 1):
        got = mx.load(str(tmp_path / f"rank{r}-of-2.safetensors"))
        assert got.keys() == ref.keys() and len(ref) > 0
        assert sum(mx.linalg.norm(v).item() for v in ref.values()) > 0  # (lora_a's are 0: lora_b starts at 0)
        for k in ref:
            assert mx.linalg.norm(got[k] - ref[k]).item() <= 1e-5 * mx.linalg.norm(ref[k]).item() + 1e-12, k


@pytest.fixture(scope="module")
def two_process_run(tiny_inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("dp-straight") / "out"
    summary, _ = run_train(tiny_inputs, out, **TWO)
    assert summary["steps"] == 8 and summary["processes"] == 2 and summary["resumed_from_step"] is None
    return out


def test_two_process_run_killed_and_resumed_equals_uninterrupted(
    tiny_inputs: dict[str, Path], two_process_run: Path, tmp_path: Path  # noqa: F811
) -> None:
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys, json
        sys.path[:0] = [{str(ROOT / 'src')!r}, {str(ROOT / 'tests')!r}]
        from pathlib import Path
        from test_train import run_train
        inputs = {{k: Path(v) for k, v in json.loads(sys.argv[1]).items()}}
        summary, _ = run_train(inputs, Path(sys.argv[2]), **json.loads(sys.argv[3]))
        print(json.dumps(summary))
    """)
    args = [sys.executable, "-c", script, json.dumps({k: str(v) for k, v in tiny_inputs.items()}), str(out),
            json.dumps(TWO)]  # fmt: skip
    ckpts = tmp_path / "out.work" / "checkpoints"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while not (ckpts / "step-000006" / "manifest.json").exists():
        assert proc.poll() is None, proc.stdout.read().decode() + proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint at step 6 in time"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    assert not (out / "adapters.safetensors").exists(), "killed run must not have finished"

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["processes"] == 2 and summary["resumed_from_step"] in (6, 7)
    assert max_abs_diff(out / "adapters.safetensors", two_process_run / "adapters.safetensors") <= 1e-6
    assert metric_rows(out / "metrics.csv") == metric_rows(two_process_run / "metrics.csv")


def test_local_ring_gives_each_rank_its_port_and_a_share_of_the_cores(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("FARENSE_DISTRIBUTED_BACKEND", raising=False)
    envs = local_ring(2, tmp_path)
    assert [e["MLX_RANK"] for e in envs] == ["0", "1"]
    hosts = json.loads(Path(envs[0]["MLX_HOSTFILE"]).read_text())
    assert envs[0]["MLX_HOSTFILE"] == envs[1]["MLX_HOSTFILE"] and len(hosts) == 2
    assert hosts[0][0].startswith("127.0.0.1:") and hosts[0] != hosts[1]
    assert envs[0]["OPENBLAS_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")  # the user's own setting wins
    assert "OPENBLAS_NUM_THREADS" not in local_ring(2, tmp_path)[1]
    tcfg = load_config(None, TWO).train
    assert uses_local_ring(tcfg) == (not mx.cuda.is_available())
    monkeypatch.setenv("FARENSE_DISTRIBUTED_BACKEND", "mpi")
    assert not uses_local_ring(tcfg)


NO_DROPOUT = {"train.lora_dropout": 0.0}  # dropout's noise differs by rank (each sees other examples)


def test_two_processes_train_what_one_process_trains(tiny_inputs: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    one, two = tmp_path / "one" / "out", tmp_path / "two" / "out"
    assert run_train(tiny_inputs, one, **(TWO | NO_DROPOUT | {"train.devices": 1}))[0]["processes"] == 1
    assert run_train(tiny_inputs, two, **(TWO | NO_DROPOUT))[0]["processes"] == 2
    # The ranks were started here, not by mlx.launch: their ring hostfile is in the work folder.
    assert (tmp_path / "two" / "out.work" / "ring-hosts.json").is_file() or mx.cuda.is_available()
    assert max_abs_diff(two / "adapters.safetensors", one / "adapters.safetensors") <= 1e-5
    rows_one, rows_two = read_metrics(one / "metrics.csv"), read_metrics(two / "metrics.csv")
    assert [(r["kind"], r["step"]) for r in rows_one] == [(r["kind"], r["step"]) for r in rows_two]
    # validation is split between the ranks (each takes every other batch) and summed: the same loss
    assert sum(r["kind"] == "valid" for r in rows_two) >= 2
    for a, b in zip(rows_one, rows_two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)


STUBBORN = """
import signal, sys, time
from pathlib import Path
if sys.argv[2] == "ignore":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    Path(sys.argv[1] + ".started").write_text("")
    time.sleep(60)
except KeyboardInterrupt:
    Path(sys.argv[1]).write_text("checkpoint")
"""


@pytest.fixture
def sigint_ignored():
    """This process as started in the background by a script (`cmd &`): SIGINT ignored, which children inherit."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, previous)


def test_stopping_ranks_interrupts_them_then_kills_what_ignores_it(tmp_path: Path, sigint_ignored: None) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", STUBBORN, str(tmp_path / f"r{i}"), mode],
                              preexec_fn=default_sigint)  # as start_ranks starts them
             for i, mode in enumerate(("obey", "ignore"))]  # fmt: skip
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"r{i}.started").exists() for i in range(2)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    tic = time.monotonic()
    _stop(procs, grace_s=2.0)
    assert time.monotonic() - tic < 10
    assert procs[0].returncode == 0, "the rank that obeys SIGINT was killed before it finished"
    assert (tmp_path / "r0").read_text() == "checkpoint"
    assert not (tmp_path / "r1").exists() and procs[1].returncode == -signal.SIGKILL


def test_without_default_sigint_a_background_parent_leaves_ranks_deaf_to_ctrl_c(tmp_path: Path,
                                                                                sigint_ignored: None) -> None:
    """What default_sigint is for: the same rank started plainly under a parent that ignores SIGINT is killed."""
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN, str(tmp_path / "r"), "obey"])
    deadline = time.monotonic() + 30
    while not (tmp_path / "r.started").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _stop([proc], grace_s=1.0)
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "r").exists()


def test_auto_devices_is_two_processes_on_a_cpu_and_one_per_cuda_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from farense import distributed

    auto = lambda **kw: distributed.requested_processes(load_config(None, {"train.devices": "auto"} | kw).train)  # noqa: E731
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert auto() == 2
    assert auto(**{"train.batch_size": 1}) == 1  # every process needs an example of each batch
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert auto() == 1
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert auto() == 1
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_count", lambda device: 4)
    assert auto() == 4
    assert distributed.requested_processes(load_config(None, {"train.devices": 3}).train) == 3


def test_a_rank_that_fails_stops_rank_0_instead_of_leaving_it_waiting(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """launch_train's watcher: rank 1 dies while rank 0 would wait on it (here: sleep 60 s); rank 0 is interrupted
    (so it could save a checkpoint) and the stage fails with the error, well before rank 0 would have ended."""
    from farense import distributed
    from farense.config import FarenseConfig
    from farense.errors import TrainingError
    from farense.stages import StageContext

    marker = tmp_path / "r0"
    failing = ("import sys, time; from pathlib import Path\n"
               "while not Path(sys.argv[1]).exists(): time.sleep(0.05)\n"
               "sys.exit(3)")  # fmt: skip

    def start_ranks(n, job, work, tcfg, env):  # noqa: ANN001, ANN202
        rank0 = subprocess.Popen([sys.executable, "-c", STUBBORN, str(marker), "obey"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint)  # fmt: skip
        rank1 = subprocess.Popen([sys.executable, "-c", failing, str(marker) + ".started"])
        return [rank0, rank1], []

    monkeypatch.setattr(distributed, "start_ranks", start_ranks)
    ctx = StageContext(upstream={}, out_dir=tmp_path / "out", work_dir=tmp_path / "work")
    tic = time.monotonic()
    with pytest.raises(TrainingError, match="2 processes"):
        distributed.launch_train(FarenseConfig(), ctx, 2)
    assert time.monotonic() - tic < 45
    assert marker.read_text() == "checkpoint"  # rank 0 got SIGINT, not SIGKILL
