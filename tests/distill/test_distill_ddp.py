"""Two processes with gloo: DistributedDataParallel distillation on CPU."""

import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp

from kdtool.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
from kdtool.models import create_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _teacher(path):
    torch.manual_seed(0)
    meta = ModelMeta(arch="tiny_cnn", num_classes=10, in_chans=1, input_size=[8, 8],
                     mean=[0.3], std=[0.37])
    save_checkpoint(path, create_model("tiny_cnn", in_chans=1), meta, force=False)


def _worker(rank, world, port, teacher, out, dump):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from kdtool.distill.loop import DistillConfig, DistillRun

    batches, real_epoch = [], DistillRun._epoch

    def recording_noise(self, step_fn, student, noise, epoch, *a):
        draw = noise.sample

        def sample(n, gen):
            x = draw(n, gen)
            batches.append(x.clone())
            return x

        noise.sample = sample
        return real_epoch(self, step_fn, student, noise, epoch, *a)

    DistillRun._epoch = recording_noise  # a spawned process of its own: nothing to restore
    run = DistillRun(DistillConfig(teacher=str(teacher), student="tiny_cnn", epochs=2,
                                   iters_per_epoch=3, batch_size=32, device="cpu"), out)
    run.run()
    torch.save(run.student.state_dict(), dump / f"rank{rank}.pt")
    torch.save(batches[0], dump / f"noise{rank}.pt")


def test_two_ranks_hold_identical_students(tmp_path):
    _teacher(tmp_path / "t.safetensors")
    mp.spawn(_worker, args=(2, _free_port(), tmp_path / "t.safetensors",
                            tmp_path / "s.safetensors", tmp_path), nprocs=2)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # ... trained on different noise: each rank draws its own (seed + rank)
    assert not torch.equal(torch.load(tmp_path / "noise0.pt", weights_only=True),
                           torch.load(tmp_path / "noise1.pt", weights_only=True))
    saved = load_checkpoint(tmp_path / "s.safetensors")[0].state_dict()  # rank 0 wrote it
    assert all(torch.equal(a[k], saved[k]) for k in a)


def test_torchrun_entry_point(tmp_path):
    _teacher(tmp_path / "t.safetensors")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "kdtool", "distill", "--teacher",
           str(tmp_path / "t.safetensors"), "--student", "tiny_cnn", "--epochs", "1",
           "--iters-per-epoch", "2", "--batch-size", "32", "--device", "cpu", "--out",
           str(tmp_path / "s.safetensors"), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # only rank 0 prints
    assert '"world_size": 2' in lines[0]
    assert (tmp_path / "s.safetensors").exists()


def _global_worker(rank, world, port, dump):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from kdtool.distill.teacher import FrozenTeacher

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_chans=1)
    full = torch.randn(2 * 16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    mine = full[rank * 16:(rank + 1) * 16]
    if rank == 0:  # --val is answered by rank 0 alone: no all-reduce may wait for rank 1
        from kdtool.distill.loop import _Answering

        alone = _Answering(FrozenTeacher(model, stats="global"))(mine)
        torch.save(alone, dump / "alone.pt")
    out = {"global": FrozenTeacher(model, stats="global")(mine),
           "rank": FrozenTeacher(model, stats="rank")(mine)}
    torch.save({**out, "state": model.state_dict()}, dump / f"g{rank}.pt")
    dist.destroy_process_group()


def test_global_teacher_statistics_equal_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_global_worker, args=(2, _free_port(), tmp_path), nprocs=2)
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_chans=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from kdtool.distill.teacher import FrozenTeacher

    full = torch.randn(2 * 16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = FrozenTeacher(model)(full)  # one process, batch 32
    halves = [FrozenTeacher(model)(full[i * 16:(i + 1) * 16]) for i in range(2)]
    for rank in range(2):
        got = torch.load(tmp_path / f"g{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["global"], whole[rank * 16:(rank + 1) * 16],
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got["rank"], halves[rank])  # per-rank: its own half
        assert not torch.allclose(got["rank"], got["global"], atol=1e-3)
        assert all(torch.equal(got["state"][k], v) for k, v in before.items())
    torch.testing.assert_close(torch.load(tmp_path / "alone.pt", weights_only=True), halves[0])
