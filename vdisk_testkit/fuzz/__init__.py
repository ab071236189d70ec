"""The fuzz harnesses: common (scratch files, the error rule, mutators) and one
fuzz_TARGET module per target, each with ``one_input(data)`` and ``build_seeds()``.
Run one under atheris with ``python -m vdisk_testkit.fuzz.fuzz_TARGET CORPUS -runs=N``
or all through tools/fuzz/run.py."""
