"""dtrain's launcher: CLI, GPU selection and reservation, process launch plans, SLURM submission.

Nothing here imports torch at module load: `dtrain --help` must answer instantly.
"""
