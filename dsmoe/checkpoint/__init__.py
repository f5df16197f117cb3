"""A run's checkpoints, in one place: the folder layout on disk (``folder``: tags, the COMPLETE marker, pointers,
staging, pruning, data cursor files, whether a checkpoint fits a config; no torch), DeepSpeed's files read safely and
written with errors that name them (``safe_io``), and saving and restoring a run's whole state (``manager``)."""
