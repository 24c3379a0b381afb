"""The ablation study runner: ``python -m shakespeare_gpt.tools.ablate STUDY.yaml --jobs 2``.

Its seams, one module each: ``study`` (the study file, parsed into dataclasses), ``runner`` (the rounds,
one run, the engine that runs them, and the results store; any object with ``submit`` and ``outcomes``
can stand in for ``RayEngine``), ``verdicts`` (the statistics), ``report`` (Markdown and plots) and
``__main__`` (the command line: parse, lock, run, report).
"""
