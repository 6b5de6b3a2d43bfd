"""Top-k then top-p truncation, shared by every sampling backend: r1kit's engine draws among the kept
candidates, the backends that draw from full logits (HF generate, the DeepSeek-V3 decoder) mask the
rest to -inf. Order and semantics of HF's ``TopKLogitsWarper`` then ``TopPLogitsWarper``: top-p acts
on the renormalized top-k mass and keeps a token while the mass above it is < top_p. Source:
Holtzman et al. 2020 (nucleus sampling)."""

from __future__ import annotations

import torch

TOP_P_CANDIDATES = 1024  # tokens kept before the exact top-p cut; a full sort is the fallback


def truncated_candidates(logp: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens that top-k (0 = off), then top-p, keep from log-probabilities ``logp`` (b, V).

    Top-p alone looks at the ``TOP_P_CANDIDATES`` most likely tokens and sorts the full vocabulary
    only for a batch where they hold less than ``top_p`` of the mass. Call with top_k > 0 or top_p < 1.

    Returns:
        ids (b, c) int64, sorted by probability, descending, and their weights (b, c): the (top-k
        renormalized) probabilities, 0 for the candidates top-p drops.
    """
    vocab = logp.shape[-1]
    k = min(top_k or TOP_P_CANDIDATES, vocab)
    cand_logp, cand_ids = logp.topk(k, dim=-1)  # (b, k), sorted descending
    if top_k:
        cand_logp = cand_logp.log_softmax(-1)  # top-p acts on the renormalized top-k mass
    probs = cand_logp.exp()
    if top_p < 1:
        if not top_k and bool((probs.sum(-1) < top_p).any()):
            cand_logp, cand_ids = logp.sort(dim=-1, descending=True)
            probs = cand_logp.exp()
        mass_before = probs.cumsum(-1) - probs  # keep a token while the mass above it is < top_p
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    return cand_ids, probs


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit that ``truncated_candidates`` does not keep (top_k 0 = off, top_p 1 =
    off). logits (b, V) -> (b, V)."""
    if top_k <= 0 and top_p >= 1.0:
        return logits
    ids, weights = truncated_candidates(logits.float().log_softmax(-1), max(top_k, 0), top_p)
    keep = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, ids, weights > 0)
    return logits.masked_fill(~keep, float("-inf"))
