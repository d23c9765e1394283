"""Performance benchmark: step time, memory, checkpoint size, merge and swap cost of sparse adapters vs PEFT.

Run ``python -m benchmarks.perf.run`` (full, a few minutes) or ``--quick`` (tiny dims, seconds). See
``docs/performance.md`` for what each metric means and how it is measured.
"""
