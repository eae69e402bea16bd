"""A minimal training loop on aspect-ratio-bucketed batches, with SDXL-style size conditioning,
multi-GPU (torchrun) and exact resume.

    python examples/train.py manifest.parquet --epochs 2                      # one process, GPU or CPU
    torchrun --nproc_per_node=8 examples/train.py manifest.parquet --epochs 2  # one process per GPU
    python examples/train.py manifest.parquet --checkpoint ck.pt --resume      # continue where ck.pt stopped

The model is a toy (a small convolutional autoencoder that takes any bucket size); swap in yours.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dali_arb import BucketSpec, DALIBucketIterator
from dali_arb.sdxl import add_time_ids


class TinyAutoencoder(nn.Module):
    """Conv encoder/decoder; works for any H, W divisible by 4 (every bucket is a multiple of 64)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.encode = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.SiLU(), nn.Conv2d(width, width, 3, 2, 1))
        self.decode = nn.Sequential(
            nn.ConvTranspose2d(width, width, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(width, 3, 4, 2, 1)
        )
        self.size_embedding = nn.Linear(6, width)  # SDXL's add_time_ids, in miniature

    def forward(self, images: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        latent = self.encode(images)
        latent = latent + self.size_embedding(time_ids)[:, :, None, None]
        return self.decode(latent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop each epoch after this many steps (for a quick try)"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument(
        "--leftover", default="auto", choices=["auto", "partial", "nearest", "drop", "duplicate"],
        help="what a bucket's remainder becomes (default auto: partial for small datasets, else nearest)",
    )  # fmt: skip
    parser.add_argument("--small", action="store_true", help="small buckets (about 128x192) for a fast run on the CPU")
    parser.add_argument("--checkpoint", help="save model, optimizer and loader state here after every step")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    args = parser.parse_args()

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    buckets = (
        BucketSpec(max_area=128 * 192, min_dim=64, max_dim=256, step=32, base=(128, 128))
        if args.small
        else BucketSpec()
    )
    # rank and world size come from torchrun's environment / torch.distributed
    loader = DALIBucketIterator(
        args.manifest,
        batch_size=args.batch_size,
        buckets=buckets,
        device=args.device if args.device != "auto" else ("gpu" if use_cuda else "cpu"),
        flip=0.5,
        dtype="float32",
        seed=42,
        leftover=args.leftover,
    )
    torch.manual_seed(0)
    model = TinyAutoencoder().to(device)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    if args.resume and args.checkpoint and os.path.exists(args.checkpoint):
        state = torch.load(args.checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])  # the next batch is the one that would have come

    rank = dist.get_rank() if distributed else 0
    for epoch in range(loader.epoch, args.epochs):
        loader.set_epoch(epoch)  # keeps a resumed position inside this epoch
        for batch in loader:
            images = batch["images"].to(device, non_blocking=True)
            # SDXL conditioning: (original_size, crop_top_left, target_size), each (h, w) / (top, left)
            time_ids = add_time_ids(batch, device=device) / 1024
            loss = F.mse_loss(model(images, time_ids), images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            record = {"rank": rank, "epoch": batch["epoch"], "step": batch["step"], "size": batch["target_size"],
                      "loss": round(loss.item(), 4), "ids": batch["ids"]}  # fmt: skip
            sys.stdout.write(json.dumps(record) + "\n")  # one write per line: ranks share the terminal
            sys.stdout.flush()
            if args.checkpoint and rank == 0:
                torch.save(
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loader": loader.state_dict()},
                    args.checkpoint,
                )
            if args.max_steps is not None and batch["step"] + 1 >= args.max_steps:
                break
    if loader.failed:
        print(
            f"rank {rank}: {len(loader.failed)} sample(s) were unreadable and replaced: {loader.failed[:10]}",
            flush=True,
        )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
