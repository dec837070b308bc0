"""The command line and the tools around it: ``cli`` (``fastat``), ``eval_cli`` (``fastat eval``),
``export``, ``bench`` and ``bench_data``. The top layer: nothing imports it.
"""
