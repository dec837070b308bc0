"""Equivariant adversarial training of lucidrains' denoising-diffusion-pytorch Unet with fastat's objective.

    python examples/lucidrains_unet.py --steps 500

``GaussianDiffusion`` keeps its role as the description of the diffusion (its defaults: v-prediction,
the sigmoid beta schedule, a per-timestep loss weight): ``ATObjective`` reads its schedule and prediction
type from it and takes its ``loss_weight``, so the denoising term is exactly ``diffusion.p_losses``
(tested) and the equivariance regulariser is added on top. After training, the model samples with
lucidrains' own ``diffusion.sample`` and with fastat's DDIM sampler. The data are synthetic smooth colour
images in [0, 1] (lucidrains' convention; ``diffusion.normalize`` maps them to [-1, 1]).
"""

import argparse

import torch
import torch.nn.functional as F
from denoising_diffusion_pytorch import GaussianDiffusion, Unet

import fastat


def toy_images(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` smooth colour images in [0, 1]: 4x4 uniform noise upsampled."""
    low = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--dim", type=int, default=32, help="Unet width")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--mode", default="adv", choices=["ddpm", "rand", "adv", "pgd"])
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps when sampling")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = Unet(dim=args.dim, dim_mults=(1, 2, 2), flash_attn=False)
    diffusion = GaussianDiffusion(
        unet, image_size=args.image_size, timesteps=1000, sampling_timesteps=args.sample_steps
    )
    diffusion.to(device)
    objective = fastat.ATObjective(schedule=diffusion, mode=args.mode, dm_weight=diffusion.loss_weight)
    print(f"schedule {objective.schedule}, prediction {objective.prediction}, mode {objective.mode}")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    data = toy_images(512, args.image_size, args.seed)
    generator = fastat.ops.rank_generator(args.seed, device)
    batches = torch.Generator().manual_seed(args.seed)

    for step in range(1, args.steps + 1):
        x0 = diffusion.normalize(
            data[torch.randint(0, len(data), (args.batch_size,), generator=batches)].to(device)
        )
        out = objective(unet, x0, generator)  # the Unet is called as unet(x_t, t)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == args.steps:
            stats = {k: f"{v.item():.4f}" for k, v in out.stats.items()}
            print(f"step {step} loss {out.loss.item():.4f} {stats}")

    unet.eval()
    with torch.no_grad():
        theirs = diffusion.sample(batch_size=4)  # lucidrains' sampler, in [0, 1]
    noise = torch.randn(4, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
    ours = fastat.ddim_sample(unet, diffusion, noise.to(device), steps=args.sample_steps, clip_x0=1.0)
    ours = diffusion.unnormalize(ours)
    print(f"diffusion.sample: {tuple(theirs.shape)} mean {theirs.mean():.3f}; "
          f"fastat.ddim_sample: {tuple(ours.shape)} mean {ours.mean():.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
