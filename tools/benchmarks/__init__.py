"""The cases of tools/bench.py, each run in a process of its own."""
