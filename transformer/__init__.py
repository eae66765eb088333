"""transformer: the Transformer of "Attention Is All You Need" as real, fast software."""

import os

# OpenMP threads that spin while waiting make PyTorch 10-30x slower on a CPU shared with another busy
# process (measured here: an Adam step took 1.3 s instead of 72 ms with one other process running); passive
# waiting costs nothing measurable on an idle machine. Only effective if torch is not imported yet, and a
# value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
