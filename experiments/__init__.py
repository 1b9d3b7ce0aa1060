"""GPU benchmarks, checks and the autotuner of jaxmoe and kernels, run from the repository root as
`python -m experiments.<name>`; results go to experiments/results/<device>/<date>-<what>.json."""
