"""Document boundaries in packed sequences, shared by the mLSTM and sLSTM cells."""

import torch


def document_resets(doc_ids: torch.Tensor | None, B: int, S: int, device) -> torch.Tensor:
    """(B, S) bool: True where the state is reset before the token (the doc id differs from t-1;
    never at t = 0). All False without ``doc_ids``."""
    reset = torch.zeros(B, S, dtype=torch.bool, device=device)
    if doc_ids is not None and S > 1:
        reset[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return reset
