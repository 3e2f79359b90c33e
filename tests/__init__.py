"""The test suite (a regular package, so that a site-packages `tests` package some dependencies ship,
latex2sympy2 via lmms-eval, cannot shadow it in spawned worker processes)."""
