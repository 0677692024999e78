"""Hydra configs every experiment shares (``hydra.searchpath: [pkg://harness.conf]`` in each ``config.yaml``):
``hydra/launcher/slurm.yaml`` and ``hydra/launcher/local.yaml``, the submitit launchers for sweeps."""
