"""Test support shared by the real-process tests (configs, launching, reading outputs)."""
