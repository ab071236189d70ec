"""The simulators, models, helpers and fuzz harnesses that tests/ and tools/ share.

One importable place instead of directories put on the import path: the test suite
(tests/), the campaigns (tools/campaign_*.py, tools/fault_campaign*.py), the
fuzz runner (tools/fuzz/run.py) and the benchmarks import these modules as
``vdisk_testkit.NAME``, and child processes run them with
``python -m vdisk_testkit.NAME``.  The package is declared beside vdisk in
pyproject.toml, so the README's install command (``pip install -e '.[test]'``)
makes it importable from anywhere; it needs the test extra, not a user.

Helpers:      helpers (patterns, block sets, memory of a child), qemu_helpers,
              nbd_client (a raw NBD client), nbd_helpers, nbdserve (NBD servers
              as processes), live_helpers (stamp writers), guest (a TCG Linux
              guest), deltacraft (hostile deltas), machines (the shared rules
              of the hypothesis state machines)
Simulators:   crashsim (power loss: the workload, the model, the checks),
              killsim (SIGKILLed writers), faultsim (I/O faults at every call),
              opfaultsim with faultshim.c (faults below Python), repairsim (lost
              header commits), nbdkill (SIGKILLed NBD server), livestop and
              livekill (live backups stopped at every step)
Fuzzing:      fuzz/ (common and one harness per target; tools/fuzz/run.py runs
              them under atheris, tests/test_fuzz_regressions.py under hypothesis)

docs/RELIABILITY.md says which contract each simulator checks and what the
long runs found.
"""
