"""meshplane's benchmark suite: convergence, connection storms, scale, against physical floors (grpcio, C++).

Run from the repository root, e.g. `.venv/bin/python -m bench.run_all`; docs/benchmarks.md says
what each module measures and how.
"""
