"""Training: the DINO loss, schedules, the engine (one optimizer step), the loop, building and resuming a run."""
