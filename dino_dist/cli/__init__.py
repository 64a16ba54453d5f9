"""Thin commands: parse arguments, call the library, turn the outcome into an exit code."""
