"""The library core of adversarial training (AT): the objective and everything it is made of.

``ops`` (the fused operations), ``schedule`` (noise schedules), ``prediction`` (eps / v / x0 outputs),
``budget`` (the perturbation radius r(t)), ``attack`` (PGD on the noise), ``replay`` (``free``'s batch
replays), ``objective`` (:class:`ATObjective`), ``sampling`` (DDPM/DDIM) and ``seeding``. Imports only
:mod:`fastat.kernels` and :mod:`fastat.utils`: any diffusion codebase can use it without the trainer.
"""
