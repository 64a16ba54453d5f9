"""`dino-bench`: what a DINO step costs, against the model's own compute and reference code.

Modules: cli (the command), step_bench (the real step, timed), floor (the model floor),
phases (per-phase timing), flops (model FLOPs and MFU), data_bench (multi-crop throughput),
reference_pipeline (the paper's PIL pipeline, for comparison), images (benchmark JPEGs).
"""
