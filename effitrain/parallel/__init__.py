"""Several processes for one run: who this process is (`world`), how a global batch is split
(`batches`), and how the processes are started (`launch`: effitrain's `trainer.devices`,
`torchrun`, or the tasks of a SLURM job)."""
