"""The process group: set-up from torchrun, SLURM or MPI, error agreement, and the bucketed all-to-all."""
