"""kdpipe's benchmarks and GPU check: a package of the source checkout (not installed).

Run one as `python -m tools.bench_loader ...` (or `python tools/bench_loader.py ...`) from the repository root,
or through `kdpipe bench ...`; they import each other as `tools.<name>`.
"""
