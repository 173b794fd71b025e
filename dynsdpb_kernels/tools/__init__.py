"""The jobs behind the `dynsdpb` command: the finetune comparison and the benchmarks.

Tools import the library; the library never imports tools (cli.py imports each one lazily, when its
command runs).
"""
