#!/usr/bin/python3
"""The torchrun side of bench/recovery.py: DDP training of the same GPT as bench/torch_gpt.py
(gpt-tiny) under TorchElastic (c10d rendezvous), checkpointing every --every steps from rank 0
and resuming from the checkpoint when the agent restarts the workers. Prints one JSON line per
completed step: {"step", "time", "pid", "world"}.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_gpt import PRESETS, Gpt  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    vocab, context, layers, heads, c = PRESETS["gpt-tiny"]
    torch.manual_seed(1337)
    model = Gpt(vocab, context, layers, heads, c)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    step = 0
    if os.path.exists(args.ckpt):
        state = torch.load(args.ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    ddp = DistributedDataParallel(model)
    per_rank = max(1, args.batch // world)
    while step < args.steps:
        g = torch.Generator().manual_seed(step * 1000 + rank)
        data = torch.randint(0, vocab, (per_rank, context + 1), generator=g)
        loss = ddp(data[:, :-1], data[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        print(json.dumps({"step": step, "time": time.time(), "pid": os.getpid(),
                          "world": world, "rank": rank}), flush=True)
        if rank == 0 and step % args.every == 0:
            tmp = args.ckpt + ".tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
            os.replace(tmp, args.ckpt)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
