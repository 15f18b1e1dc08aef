"""Tooling beside the core library: benchmarks, the PyTorch baseline and reference model,
parameter accounting, report tables and plots. Training and sampling never import it.

    python -m chatgot_jax.tools.bench           train-step / sampling benchmarks, --grid
    python -m chatgot_jax.tools.bench_sampling  cached sampling vs full recompute
    python -m chatgot_jax.tools.params          parameter accounting
    python -m chatgot_jax.tools.plot            training curves of run directories
"""
