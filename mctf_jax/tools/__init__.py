"""Tools around the model, each with a command line (``python -m mctf_jax.tools.<name>``).

    flops.py      FLOPs as the paper counts them (mctf_jax.cost), per block, and XLA's count
    compile.py    the entry points' programs compiled ahead of time for TPU slices
    benchmark.py  forward throughput with and without fusion, compile time, memory
    profiling.py  kernel and compile time by part of the model (jax.profiler traces)
    visualize.py  which patches each fused token holds; accuracy against GFLOPs
"""
