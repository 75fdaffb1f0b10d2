"""Checkpoints on disk: the Hub downloader, what a model folder holds, demo checkpoints."""
