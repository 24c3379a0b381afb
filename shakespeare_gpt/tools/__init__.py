"""Tools built on the core: the benchmark (``bench``), the ablation study (``study``: the study
file; ``ablate``: the runner; ``report``: its report). They import the core; the core never
imports them.
"""
