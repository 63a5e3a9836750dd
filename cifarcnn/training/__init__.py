"""Training: the trainer, its step, checkpoints, interrupts, the run lock, distributed runs and the state a run
resumes from. Imports data and the base."""
