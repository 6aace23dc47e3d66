"""Training hooks for torchrun: two CPU processes (gloo) average their gradients exactly."""

from __future__ import annotations

import copy
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qpcell.distributed import (
    Context,
    barrier,
    broadcast,
    default_loader_settings,
    mean_over_ranks,
    rank_device,
    setup,
    shard,
    unwrap,
    wrap,
)
from qpcell.errors import QpcellError

WORLD = 2
N_ITEMS = 7  # not a multiple of the world size: rank 1 gets a repeated item


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 1, 1))


def _grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _rank_main(rank: int, port: int, folder: str) -> None:
    """One of two training processes, set up as torchrun would."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "WORLD_SIZE": str(WORLD), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(WORLD)})
    torch.set_num_threads(1)
    ctx = setup("cpu")
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(N_ITEMS, 3, 8, 8, generator=gen)
    y = torch.rand(N_ITEMS, 1, 8, 8, generator=gen)
    shares = [shard(range(N_ITEMS), Context(r, WORLD)) for r in range(WORLD)]

    # gradients: DDP against each rank's own gradient computed by hand
    model = _tiny()
    alone = [_grads(copy.deepcopy(model), x[s], y[s]) for s in shares]
    ddp = wrap(model, ctx)
    mine = shard(range(N_ITEMS), ctx)
    torch.nn.functional.mse_loss(ddp(x[mine]), y[mine]).backward()
    grads = [p.grad.detach().clone() for p in unwrap(ddp).parameters()]

    # a qpcell model with its own loss, two Adam steps on different patches per rank
    from qpcell.masks import sdrdin_targets
    from qpcell.models import create_model

    torch.manual_seed(0)
    net = create_model("s-drdin", 3, base=4)
    start = [p.detach().clone() for p in net.parameters()]
    ddp_net = wrap(net, ctx)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    patches = torch.rand(4, 3, 32, 32, generator=gen)
    target = {k: torch.from_numpy(v)[None].repeat(2, 1, 1, 1) for k, v in sdrdin_targets(
        torch.tensor([[8.0, 8.0], [20.0, 24.0]]).numpy(), [0, 2], 3, (32, 32), 2.0).items()}
    for _ in range(2):
        opt.zero_grad()
        loss, _parts = net.loss(ddp_net(patches[2 * rank:2 * rank + 2]), target)
        loss.backward()
        opt.step()
    barrier(ctx)
    torch.save({"grads": grads, "alone": alone, "mine": mine, "backend": ctx.backend,
                "shared": broadcast({"from": rank}, ctx),
                "mean": mean_over_ranks(float(rank), ctx),
                "net": [p.detach().clone() for p in net.parameters()], "start": start},
               Path(folder) / f"rank{rank}.pt")


def test_two_gloo_processes_average_their_gradients(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [o["backend"] for o in out] == ["gloo", "gloo"]
    assert [o["mine"] for o in out] == [[0, 2, 4, 6], [1, 3, 5, 0]]
    mean = [sum(g) / WORLD for g in zip(*out[0]["alone"], strict=True)]
    for o in out:
        for got, want in zip(o["grads"], mean, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # ... and the mean is not what either rank had on its own
    assert not all(torch.allclose(a, b) for a, b in zip(out[0]["alone"][0], mean, strict=True))
    assert [o["shared"] for o in out] == [{"from": 0}, {"from": 0}]
    assert [o["mean"] for o in out] == [0.5, 0.5]
    # the qpcell model trained on different patches per rank and its copies stayed equal
    for a, b in zip(out[0]["net"], out[1]["net"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, s) for a, s in zip(out[0]["net"], out[0]["start"],
                                                      strict=True))


# ------------------------------------------------------------------------- one process

@given(n=st.integers(0, 40), world=st.integers(1, 5))
def test_shards_are_equal_in_size_and_cover_every_item(n, world):
    parts = [shard(list(range(n)), Context(r, world)) for r in range(world)]
    size = math.ceil(n / world) if n else 0
    assert all(len(p) == size for p in parts)
    assert set().union(*map(set, parts)) == set(range(n))
    if world == 1:
        assert parts[0] == list(range(n))


def test_a_single_process_gets_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    ctx = setup("cpu")
    assert ctx == Context(device=torch.device("cpu")) and ctx.is_main and not ctx.distributed
    model = _tiny()
    assert wrap(model, ctx) is model and unwrap(model) is model
    assert broadcast("x", ctx) == "x" and mean_over_ranks(3.0, ctx) == 3.0
    barrier(ctx)
    assert not torch.distributed.is_initialized()


def test_several_processes_without_torchrun_are_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(QpcellError, match="start training with torchrun"):
        setup("cpu")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(QpcellError, match="do not fit"):
        setup("cpu")


def test_each_process_takes_its_own_device():
    assert rank_device("cpu", 3) == torch.device("cpu")
    if torch.cuda.is_available():
        assert rank_device(None, 1) == torch.device("cuda", 1 % torch.cuda.device_count())
    else:
        assert rank_device(None, 1) == torch.device("cpu")
    with pytest.raises(QpcellError):
        rank_device("cuda:1", 0)  # one GPU for every process: refused (or no CUDA at all)


@pytest.mark.parametrize("device, cores, local, forks, want", [
    ("cuda", 2, 1, True, (0, True, 2)),
    ("cuda", 16, 1, True, (4, True, 12)),
    ("cuda", 16, 4, False, (3, True, 1)),
    ("cpu", 2, 1, True, (0, False, 2)),
    ("cpu", 16, 1, True, (2, False, 14)),
    ("cpu", 16, 1, False, (0, False, 16)),
    ("cpu", 16, 8, True, (0, False, 2)),
    ("mps", 10, 1, False, (0, False, 10)),
])
def test_loader_defaults_follow_the_device_and_the_cores(device, cores, local, forks, want):
    s = default_loader_settings(device, cores=cores, local_world_size=local, forks=forks)
    assert (s.num_workers, s.pin_memory, s.torch_threads) == want


def test_loader_defaults_share_the_cores_among_torchrun_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_loader_settings("cuda", cores=16).num_workers == 3
    s = default_loader_settings("cpu", cores=2)
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2, **s.loader_kwargs())
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]


def test_qpcell_train_under_torchrun(tmp_path):
    """``torchrun --nproc_per_node=2 -m qpcell train`` on the CPU, once train.py uses the hooks."""
    import qpcell.train

    if not hasattr(qpcell.train, "shard"):
        pytest.skip("qpcell/train.py does not call qpcell.distributed yet")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    from qpcell.synthetic import write_synthetic_project

    write_synthetic_project(tmp_path / "project", 3, (96, 96), 3, seed=5)
    out = tmp_path / "model"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [torchrun, "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "qpcell",
         "train", str(tmp_path / "project"), "--out", str(out), "--base", "4", "--epochs", "2",
         "--max-steps", "2", "--patch-size", "64", "--stride", "32", "--model-mpp", "native",
         "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("Training done") == 1  # rank 1 prints nothing
    log = (out / "train_log.txt").read_text().splitlines()
    assert [line.split()[1] for line in log] == ["1", "2"]  # one writer
    assert (out / "weights.safetensors").is_file() and (out / "resume.pt").is_file()
