"""An AT training loop written with fastat's fused ops by hand (no ATObjective): what another codebase
that keeps its own loop would write.

    python examples/ops_only_loop.py --steps 300

Per step: timesteps from a per-rank generator, the budget r(t) from (schedule, t), the noise kernel
(eps and the random start w0 drawn in-kernel from a NoiseStream whose offset advances by itself), the
clean prediction, one signed-gradient ascent step on w (``ops.pgd_step`` also writes the next model
input), the perturbed prediction and the fused AT loss. On CUDA the ops run their Triton kernels.
"""

import argparse

import torch

from fastat import ops
from fastat.at.budget import Budget
from fastat.at.schedule import NoiseSchedule
from fastat.models import build_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lam", type=float, default=0.3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # 2-D points on a ring, and fastat's MLP denoiser model(x, t) -> eps
    angle = torch.rand(4096, generator=torch.Generator().manual_seed(args.seed)) * 2 * torch.pi
    data = torch.stack([angle.cos(), angle.sin()], dim=1).to(device)
    model = build_model("mlp", dim=2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    schedule, budget = NoiseSchedule("linear", T=1000), Budget(r_min=0.2, r_scale=0.3)
    generator = ops.rank_generator(args.seed, device)  # this process's t (and batch order)
    stream = ops.NoiseStream(args.seed, device)  # this process's eps and w0: a new offset every call

    for step in range(1, args.steps + 1):
        x0 = data[torch.randint(0, len(data), (args.batch_size,), generator=generator, device=device)]
        t = schedule.sample_t(args.batch_size, generator, device=device)
        a, s = schedule.coeffs(t)
        r = budget.radius_at(schedule, t)  # bound on w at each t (x-space budget divided by s_t)
        x_t, x_adv, eps, w0 = ops.noise_inject(x0, a, s, r, stream)  # x_adv = x_t + s*w0

        eps_pred = model(x_t, t)
        # the attack: one ascent step on J(w) = ||eps_theta(x_t + s w) - eps_theta(x_t)||^2 from w0
        x_in = x_adv.detach().requires_grad_(True)
        j = (model(x_in, t) - eps_pred.detach()).square().sum()
        (grad,) = torch.autograd.grad(j, [x_in])  # dJ/dx has the sign of dJ/dw (s_t > 0)
        model.zero_grad(set_to_none=True)
        w, x_adv = ops.pgd_step(w0, grad, r, 1.25 * r, "linf", x_t=x_t, s=s)  # projected; next input too

        loss = ops.at_loss(eps_pred, model(x_adv, t), eps, w, args.lam)  # DDPM loss + equivariance term
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps:
            print(f"step {step} loss {loss.item():.4f} mean |w| {w.abs().mean().item():.3f}")


if __name__ == "__main__":
    main()
