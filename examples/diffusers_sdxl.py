"""Fine-tune an SDXL UNet on aspect-ratio-bucketed batches with diffusers' own models.

Every batch is one bucket resolution; SDXL's size conditioning (``time_ids``) comes straight from the batch:
``original_size`` (EXIF-upright source size), ``crop_top_left`` (after the flip) and ``target_size``.

    pip install -e .[examples]
    python examples/diffusers_sdxl.py manifest.parquet --tiny --max-steps 5             # random tiny SDXL, CPU, seconds
    python examples/diffusers_sdxl.py manifest.parquet --pretrained stabilityai/stable-diffusion-xl-base-1.0 \\
        --device gpu --max-steps 1000                                                     # the real thing

``--tiny`` builds an SDXL-architecture UNet (``addition_embed_type="text_time"``, cross-attention, the same
``added_cond_kwargs``) and VAE with random weights from small configs, and stands in for SDXL's two text
encoders with a byte-level embedding, so it runs on a CPU in seconds without any download. Prints one line
per step with ``loss``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from dali_arb import BucketSpec, DALIBucketIterator
from dali_arb.sdxl import add_time_ids

#: SDXL's buckets are about 1024x1024 in area, sides multiples of 64 (the VAE divides by 8, the UNet by 4 more).
SDXL_BUCKETS = BucketSpec(max_area=1024 * 1024, min_dim=512, max_dim=2048, step=64, base=(1024, 1024))
#: --tiny: small buckets (sides multiples of 32) so that a CPU trains in seconds.
TINY_BUCKETS = BucketSpec(max_area=96 * 96, min_dim=64, max_dim=160, step=32, base=(96, 96))


class ByteTextEncoder(nn.Module):
    """A stand-in for SDXL's two CLIP text encoders: each caption's UTF-8 bytes (77 at most) embedded, giving
    ``prompt_embeds [B, 77, dim]`` and ``pooled [B, pooled_dim]`` as the real pair does."""

    def __init__(self, dim: int, pooled_dim: int, length: int = 77) -> None:
        super().__init__()
        self.length = length
        self.tokens = nn.Embedding(257, dim)  # 256 byte values and padding
        self.position = nn.Parameter(torch.zeros(length, dim))
        self.pool = nn.Linear(dim, pooled_dim)

    def forward(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(captions), self.length), 256, dtype=torch.long)
        for i, caption in enumerate(captions):
            data = list(caption.encode("utf-8")[: self.length])
            ids[i, : len(data)] = torch.tensor(data, dtype=torch.long)
        hidden = self.tokens(ids.to(device)) + self.position
        return hidden, self.pool(hidden.mean(dim=1))


def tiny_sdxl() -> tuple[nn.Module, nn.Module, ByteTextEncoder]:
    """An SDXL-architecture UNet and VAE with random weights (the shapes of diffusers' own SDXL test models)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",  # SDXL: pooled text embedding + six size numbers
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # time_ids x addition_time_embed_dim + pooled
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
    )
    return unet, vae, ByteTextEncoder(dim=64, pooled_dim=32)


class PretrainedText(nn.Module):
    """SDXL's own two text encoders and tokenizers, frozen, through the pipeline's ``encode_prompt``."""

    def __init__(self, pipe) -> None:
        super().__init__()
        self.pipe = pipe

    @torch.no_grad()
    def forward(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
            captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return prompt_embeds, pooled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", help="manifest from `dali-arb index`")
    parser.add_argument("--pretrained", metavar="PATH_OR_ID", help="an SDXL checkpoint (diffusers layout)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random SDXL-architecture model, no download")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tiny == bool(args.pretrained):
        parser.error("give exactly one of --tiny and --pretrained PATH_OR_ID")
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    from diffusers import DDPMScheduler

    if args.tiny:
        unet, vae, text = tiny_sdxl()
        scheduler = DDPMScheduler(num_train_timesteps=1000)
        buckets = TINY_BUCKETS
        trained = [*unet.parameters(), *text.parameters()]
    else:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(args.pretrained)
        unet, vae, text = pipe.unet, pipe.vae, PretrainedText(pipe)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        buckets = SDXL_BUCKETS
        trained = list(unet.parameters())
        pipe.text_encoder.to(device)
        pipe.text_encoder_2.to(device)
    unet.to(device).train()
    vae.to(device).eval().requires_grad_(False)  # SDXL fine-tuning trains the UNet; the VAE stays frozen
    text.to(device)
    optimizer = torch.optim.AdamW(trained, lr=args.lr)
    loader = DALIBucketIterator(
        args.manifest,
        batch_size=args.batch_size,
        buckets=buckets,
        device=args.device,
        dtype="float32",  # [-1, 1], what the VAE takes
        crop="random",
        flip=0.5,
        caption_dropout=0.1,  # for classifier-free guidance
        seed=args.seed,
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    step = 0
    started = time.perf_counter()
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            images = batch["images"].to(device)
            with torch.no_grad():
                latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            with autocast:
                prompt_embeds, pooled = text(batch["captions"], device)
                added = {"text_embeds": pooled, "time_ids": add_time_ids(batch, device=device)}
                predicted = unet(noisy, timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added).sample
            loss = F.mse_loss(predicted.float(), noise.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            h, w = batch["target_size"]
            print(f"step {step} epoch {epoch} bucket {w}x{h} loss {loss.item():.5f}", flush=True)
            if not math.isfinite(loss.item()):
                print("loss is not finite; stopping", file=sys.stderr)
                return 1
            step += 1
            if args.max_steps is not None and step >= args.max_steps:
                break
        if args.max_steps is not None and step >= args.max_steps:
            break
    print(f"{step} steps in {time.perf_counter() - started:.1f} s; loader failed samples: {len(loader.failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
