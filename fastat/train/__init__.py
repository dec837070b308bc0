"""A training run: ``config`` (the frozen, sectioned :class:`TrainConfig`), ``run_config`` (its
resolution), ``state`` (what a run steps), ``loop`` (the loop), ``run`` (:func:`train`), ``run_folder``,
``checkpoint``, ``metrics``, ``samples``, ``distributed`` and ``launch`` (torchrun). Uses the step, the
data and the models; never the evaluation or the command line (those are passed in).
"""
