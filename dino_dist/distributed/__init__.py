"""Who am I in the job, process groups and collectives, DDP/FSDP wrapping, the stop flag."""
