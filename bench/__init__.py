"""Benchmarks of xllm: one command per workload of the project's ``BENCHMARKS.md`` (workloads and metric definitions).

    python -m bench.w1_offline    # W1 offline throughput vs transformers generate / continuous batching
    python -m bench.w2_online     # W2 Poisson rates through the HTTP shim; latency plot
    python -m bench.w3_single     # W3 one stream vs the eager loop and the bandwidth bound
    python -m bench.w4_prefix     # W4 shared prefix, prefix caching on vs off
    python -m bench.w5_overhead   # W5 engine step vs bare forward; scheduler alone; async on/off

Each prints a table and appends a dated section to ``bench/RESULTS.md`` (``--no-record``
to skip). Run them from the repository root, one at a time: they share the machine.
Needs the ``bench`` extra (``pip install -e .[bench]``).
"""
