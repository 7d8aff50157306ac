"""The benchmarks of metakernels: the meta-step against naive FOMAML (``meta_step``, over
``workloads``, ``variants`` and ``measure``), where a step's time goes (``diagnose``), per-op
microbenchmarks (``ops``) and the plots (``plot``). Each script runs as
``python3 bench/<script>.py``; the modules import as ``bench.<module>`` from the repository root."""
