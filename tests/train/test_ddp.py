"""Two gloo processes train data-parallel and end with identical weights."""

import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, workdir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fpkern.train import training_loop

    res = training_loop(workdir=workdir, arch="mlp", dataset="8gaussians", mlp_width=32,
                        mlp_depth=2, batch_size=32, fp_batch=8, steps=12, warmup=2,
                        ckpt_every=6, sample_steps=5, num_samples=50, eval_every=0,
                        progress=False, tensorboard=False)
    torch.save({"model": res.model.state_dict(), "ema": res.ema.state_dict()},
               os.path.join(out, f"rank{rank}.pt"))


def test_two_process_gloo(tmp_path):
    wd, out = str(tmp_path / "ddp"), str(tmp_path)
    mp.start_processes(_worker, args=(2, free_port(), wd, out), nprocs=2, start_method="spawn")
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs between ranks"
    # rank 0 alone checkpointed; the checkpoint holds both ranks' random states
    from fpkern.train.checkpoint import list_checkpoints, load_checkpoint

    ck = load_checkpoint(list_checkpoints(tmp_path / "ddp" / "checkpoints")[-1])
    assert ck["step"] == 12 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["generators"]["noise"], ck["rng"][1]["generators"]["noise"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], ck["model"][k])
