"""What a run reports: console, metrics.jsonl, TensorBoard, memory, diagnostics, health warnings, summary, plots."""
