"""Evaluations of a teacher: k-NN, during training and at the end of a run."""
