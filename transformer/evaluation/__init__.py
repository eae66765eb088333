"""sacreBLEU BLEU and chrF on detokenised text, with their signatures."""

from transformer.evaluation.evaluate import evaluate, read_lines, score_files
from transformer.evaluation.metrics import compute_metrics, format_scores

__all__ = ["compute_metrics", "format_scores", "evaluate", "score_files", "read_lines"]
