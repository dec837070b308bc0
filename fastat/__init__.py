"""fastat: fast equivariant adversarial training of diffusion models.

    import fastat
    objective = fastat.ATObjective(mode="adv")
    out = objective(model, x0, generator)   # model(x, t) -> eps
    out.loss.backward()
"""

from fastat import ops
from fastat.budget import Budget
from fastat.models import MLP, UNet, build_model
from fastat.objective import ATObjective, ATOutput
from fastat.sampling import ddim_sample, ddpm_sample
from fastat.schedule import NoiseSchedule

__version__ = "0.1.0"

__all__ = [
    "ATObjective",
    "ATOutput",
    "Budget",
    "MLP",
    "NoiseSchedule",
    "UNet",
    "build_model",
    "ddim_sample",
    "ddpm_sample",
    "ops",
]
