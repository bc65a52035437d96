"""Training machinery: the step and epoch loop (`loop`), losses, optimizers and schedules,
checkpoints, and the device/DDP plumbing (`distributed`)."""
