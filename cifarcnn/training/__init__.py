"""Training: one epoch (loop.py, the place to start), the step, the optimizers, the schedule, the weight
averages, the trainer that wires them to the data, the run folder and checkpoints, fine-tuning, interrupts,
the run lock and distributed runs. Imports data and the base."""
