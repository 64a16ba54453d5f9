"""Who am I in the job, collectives, per-rank RNG streams, DDP/FSDP wrapping, the stop flag."""
