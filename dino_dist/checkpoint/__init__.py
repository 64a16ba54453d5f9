"""Checkpoints as bytes on disk: atomic files, manifests, single-file and sharded formats, one reader, retention."""
