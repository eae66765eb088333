"""Search: greedy, beam (the step separate from the loop) and sampling filters.

All searches drive a model through ``encode`` / ``new_cache`` / ``decode`` only; see
:mod:`transformer.decoding.common` for the protocol and the length conventions.
"""

from transformer.decoding.beam import beam_search, beam_step
from transformer.decoding.common import Hypothesis, NoCache, length_penalty, max_output_lengths
from transformer.decoding.greedy import greedy_search
from transformer.decoding.sampling import sample, sample_next, top_k_filter, top_p_filter

__all__ = [
    "Hypothesis", "NoCache", "length_penalty", "max_output_lengths", "greedy_search", "beam_search", "beam_step",
    "sample", "sample_next", "top_k_filter", "top_p_filter",
]
