"""Tooling beside the core library: benchmarks, the PyTorch baseline and reference model,
parameter accounting, report tables. The core library never imports it (the training
curves, which a sweep's report draws, are chatgot_jax/plot.py).

    python -m chatgot_jax.tools.bench           train-step / sampling benchmarks, --grid
    python -m chatgot_jax.tools.bench_sampling  cached sampling vs full recompute
    python -m chatgot_jax.tools.params          parameter accounting
"""
