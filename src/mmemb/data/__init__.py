"""Datasets: MiniMMEB (the embedded benchmark), the MMEB-V2 task registry and its loaders, and
training pairs on disk.
"""
