"""One training step, eager or fast: ``engine`` (:class:`StepEngine`), ``capture`` (CUDA-graph capture and
its host-read checks), ``ema`` (the sampling weights). Built on :mod:`fastat.at`; knows nothing of runs.
"""
