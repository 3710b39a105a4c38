"""Files: mask files and their metadata, checkpoints."""
