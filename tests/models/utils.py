"""Small configurations and helpers shared by the model tests."""

import torch

from xlstm_train.models import LlamaConfig, xLSTMBlocksConfig, xLSTMLargeConfig

VOCAB = 97


def perturb_(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so that zero-initialised gates, norms and recurrent kernels
    take part in the computation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def tiny_configs():
    return {
        "xlstm_blocks": xLSTMBlocksConfig(
            vocab_size=VOCAB, embedding_dim=32, num_blocks=3, slstm_at=[1], chunk_size=8, kernel="reference"
        ),
        "xlstm_large": xLSTMLargeConfig(
            vocab_size=VOCAB, embedding_dim=32, num_blocks=2, num_heads=2, chunk_size=8, kernel="reference"
        ),
        "llama": LlamaConfig(
            vocab_size=VOCAB, embedding_dim=32, num_blocks=2, num_heads=4, max_seq_len=64,
            reset_at_document_boundaries=True,
        ),
    }
