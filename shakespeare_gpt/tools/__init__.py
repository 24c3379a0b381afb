"""Tools built on the core: the benchmark (``bench``), the ablation study (``ablate``), the comparison
with pretrained models (``compare``, ``tiny_gpt2``). They import the core; the core never imports them.
"""

from jsonargparse.typing import restricted_number_type

# jsonargparse registers a restricted type once per restriction, under one name: the tools share this one.
WindowLength = restricted_number_type("WindowLength", int, (">=", 2))  # tokens: at least one read, one predicted
