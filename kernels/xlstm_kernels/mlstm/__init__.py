"""The mLSTM cell: references (recurrent, parallel, chunkwise) and Triton kernels."""

from __future__ import annotations

import torch

from xlstm_kernels.mlstm.reference import (
    DEFAULT_CHUNK_SIZE,
    check_inputs,
    check_step_inputs,
    mlstm_chunkwise,
    mlstm_step_reference,
)

IMPLS = ("auto", "reference", "triton")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"mlstm: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        # fp64 stays on the reference: the kernels compute in fp32
        on_gpu = tensor.device.type == "cuda" and tensor.dtype != torch.float64
        return "triton" if on_gpu and _triton_available() else "reference"
    if impl == "triton" and not _triton_available():
        raise ValueError("mlstm: impl='triton' needs the triton package, which does not import here")
    return impl


def mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    *,
    c0: torch.Tensor | None = None,
    n0: torch.Tensor | None = None,
    m0: torch.Tensor | None = None,
    input_gate: str = "exp",
    chunk_size: int | None = None,
    doc_ids: torch.Tensor | None = None,
    return_state: bool = False,
    impl: str = "auto",
    eps: float = 1e-6,
):
    """The mLSTM cell over a sequence.

    q, k ``(B, NH, S, DQK)``, v ``(B, NH, S, DV)``, i, f ``(B, NH, S)`` gate pre-activations.
    Optional initial state c0 ``(B, NH, DQK, DV)``, n0 ``(B, NH, DQK)``, m0 ``(B, NH, 1)`` (exp gate
    only); missing parts are zeros. ``doc_ids`` ``(B, S)``: the state is reset to zeros before every
    token whose id differs from the previous token's. Returns h ``(B, NH, S, DV)`` in q's dtype, or
    ``(h, (c, n, m))`` with fp32 states (m is None for the sigmoid input gate).
    """
    check_inputs(q, k, v, i, f, c0, n0, m0, input_gate, doc_ids)
    impl = _resolve_impl(impl, q)
    if impl == "triton":
        from xlstm_kernels.mlstm.triton_chunkwise import mlstm_chunkwise_triton

        return mlstm_chunkwise_triton(
            q, k, v, i, f, c0=c0, n0=n0, m0=m0, input_gate=input_gate, chunk_size=chunk_size,
            doc_ids=doc_ids, return_state=return_state, eps=eps,
        )  # fmt: skip
    return mlstm_chunkwise(
        q, k, v, i, f, c0=c0, n0=n0, m0=m0, input_gate=input_gate,
        chunk_size=DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size,
        doc_ids=doc_ids, return_state=return_state, eps=eps,
    )  # fmt: skip


def mlstm_step(q, k, v, i, f, c, n, m, *, input_gate: str = "exp", eps: float = 1e-6, impl: str = "auto"):
    """One token: q, k ``(B, NH, DQK)``, v ``(B, NH, DV)``, i, f ``(B, NH)``, state (c, n, m) (Nones
    for the zero state). Returns ``(h (B, NH, DV), (c, n, m))`` with fp32 states.

    The Triton step is for generation and has no backward: ``auto`` uses it on CUDA only when no
    input needs a gradient.
    """
    check_step_inputs(q, k, v, i, f, c, n, m, input_gate)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, i, f, c, n, m)
    )
    if impl == "auto" and needs_grad:
        impl = "reference"
    impl = _resolve_impl(impl, q)
    if impl == "triton":
        from xlstm_kernels.mlstm.triton_step import mlstm_step_triton

        return mlstm_step_triton(q, k, v, i, f, c, n, m, input_gate=input_gate, eps=eps)
    return mlstm_step_reference(q, k, v, i, f, c, n, m, input_gate=input_gate, eps=eps)


__all__ = ["mlstm", "mlstm_step"]
