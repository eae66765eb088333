"""Corpus BLEU and chrF with sacreBLEU's defaults (13a tokenisation) on detokenised text, with signatures.

    result = compute_metrics(hypotheses, references)
    print(format_scores(result))      # BLEU|nrefs:1|case:mixed|eff:no|tok:13a|... = 34.2 ...
    json.dumps(result)                 # the same, machine-readable
"""

from __future__ import annotations

from typing import Any, Sequence

from sacrebleu.metrics import BLEU, CHRF

from transformer.errors import TransformerError


def compute_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """sacreBLEU corpus BLEU and chrF of detokenised ``hypotheses`` against one reference each.

    Returns:
        {"bleu", "bleu_signature", "bleu_details": {precisions, bp, sys_len, ref_len}, "bleu_text",
        "chrf", "chrf_signature", "chrf_text", "n_sentences"}; scores are on sacreBLEU's 0-100 scale and
        the ``*_text`` fields are sacreBLEU's own one-line summaries with the signature.
    Raises:
        TransformerError: the two lists differ in length or are empty.
    """
    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise TransformerError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise TransformerError("no sentences to score")
    bleu_metric, chrf_metric = BLEU(), CHRF()
    bleu = bleu_metric.corpus_score(hypotheses, [references])
    chrf = chrf_metric.corpus_score(hypotheses, [references])
    bleu_sig, chrf_sig = str(bleu_metric.get_signature()), str(chrf_metric.get_signature())
    return {
        "bleu": bleu.score,
        "bleu_signature": bleu_sig,
        "bleu_details": {"precisions": list(bleu.precisions), "bp": bleu.bp, "sys_len": bleu.sys_len, "ref_len": bleu.ref_len},
        "bleu_text": bleu.format(signature=bleu_sig),
        "chrf": chrf.score,
        "chrf_signature": chrf_sig,
        "chrf_text": chrf.format(signature=chrf_sig),
        "n_sentences": len(hypotheses),
    }


def format_scores(result: dict[str, Any]) -> str:
    """Two lines for humans: sacreBLEU's BLEU and chrF summaries, each with its signature."""
    return f"{result['bleu_text']}\n{result['chrf_text']}"
