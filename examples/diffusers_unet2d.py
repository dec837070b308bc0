"""A diffusers training loop switched to equivariant adversarial training (the lines marked "fastat").

    python examples/diffusers_unet2d.py --steps 500
    python examples/diffusers_unet2d.py --accelerate          # the same loop under accelerate
    accelerate launch examples/diffusers_unet2d.py --accelerate

diffusers_unet2d_plain.py is the same loop without AT: ``diff`` the two files to see the whole change.

The data are synthetic smooth colour images, so nothing is downloaded: put your own DataLoader in their
place. At the end it samples with diffusers' DDPMPipeline (and saves it with --out).
"""

import argparse

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

import fastat


def toy_images(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` smooth colour images in [-1, 1]: 4x4 uniform noise upsampled."""
    low = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    p.add_argument("--accelerate", action="store_true", help="run under accelerate's Accelerator")
    p.add_argument("--sample-steps", type=int, default=50, help="DDPMPipeline steps at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="save the trained DDPMPipeline in this folder")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=args.prediction_type)
    model = UNet2DModel(
        sample_size=args.image_size,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = torch.utils.data.TensorDataset(toy_images(512, args.image_size, args.seed))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator()
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        device, rank, backward = accelerator.device, accelerator.process_index, accelerator.backward
        unwrap = accelerator.unwrap_model
    else:
        device, rank = torch.device("cuda" if torch.cuda.is_available() else "cpu"), 0
        backward, unwrap = (lambda loss: loss.backward()), (lambda m: m)
        model.to(device)
    objective = fastat.ATObjective(schedule=noise_scheduler, mode="adv")  # fastat: reads the scheduler
    generator = fastat.ops.rank_generator(args.seed, device, rank)  # fastat: per process: own t, noise, w

    step = 0
    while step < args.steps:
        for (clean,) in loader:
            clean = clean.to(device)
            loss = objective(model, clean, generator).loss  # fastat: noise, attack and loss in one call
            backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if rank == 0 and (step % 50 == 0 or step == args.steps):
                print(f"step {step} loss {loss.item():.4f}")
            if step == args.steps:
                break

    if rank == 0:
        pipe = DDPMPipeline(unet=unwrap(model), scheduler=noise_scheduler)
        images = pipe(batch_size=4, num_inference_steps=args.sample_steps, output_type="np",
                      generator=torch.Generator().manual_seed(args.seed)).images  # fmt: skip
        print(f"sampled {images.shape[0]} images of {images.shape[1:]}, pixel mean {images.mean():.3f}")
        if args.out:
            pipe.save_pretrained(args.out)
            print(f"saved the pipeline to {args.out}")


if __name__ == "__main__":
    main()
