"""Invariants, one file per registered technique: `test_<technique>.py` ('-' as '_') states what theory fixes
exactly for that technique (a KL of a policy against itself is zero, a router that splits tokens evenly has a
MaxVio of zero, ...). `test_every_technique.py` fails for a registered technique without its file.

This folder is a package so that its modules (`invariants.test_dpo`) and the technique tests beside it
(`tests/test_dpo.py`, the module `test_dpo`) do not clash under pytest's default import mode.
"""
