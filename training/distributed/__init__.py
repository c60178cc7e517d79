"""Distributed training: the caption trainer under Ray Train (DDP), on one machine or a Ray cluster."""
