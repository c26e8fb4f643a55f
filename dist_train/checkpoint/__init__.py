"""Checkpoints, in one-way layers (each imports only the ones above it):

- ``layout``: names, name parsing, hashing and pointer files; torch-free, so the launcher imports it.
- ``background``: ``BackgroundWriter``, the one async-save thread of both managers; torch-free.
- ``file``: the single-file format (DDP, one process): ``ckpt-*.pt`` with sha256 sidecars.
- ``sharded``: the sharded DCP format (FSDP): one ``ckpt-*`` directory per checkpoint with a manifest.
- ``store``: the ``CheckpointStore`` the trainer saves and resumes through, whatever the format.

Importing this package does not import torch.
"""
