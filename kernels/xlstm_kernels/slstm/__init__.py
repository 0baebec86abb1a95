"""The sLSTM cell: the recurrent reference and the fused Triton kernel, behind one function.

Layouts (those of the official CUDA backend, see the xLSTM reference §2.2):
  x_gates (B, S, NH, 4, DH)  input projections W x_t, gates in the order i, f, z, o
  R       (NH, DH, 4, DH)    block-diagonal recurrent weights [head, in, gate, out]
  b       (NH, 4, DH)        gate biases
  states  (y, c, n, m)       each (B, NH, DH), fp32
"""

import torch
from xlstm_kernels.documents import document_resets
from xlstm_kernels.slstm.reference import slstm_reference, slstm_step_reference, state_dtype

try:
    from xlstm_kernels.slstm.triton_kernel import TRITON_DTYPES, slstm_triton
except ImportError:  # no triton on this platform: the reference serves every call
    slstm_triton = None
    TRITON_DTYPES = ()

__all__ = ["slstm", "slstm_step"]

IMPLS = ("auto", "reference", "triton")


def _check_weights(x_gates: torch.Tensor, R: torch.Tensor, b: torch.Tensor, gate_dims: int) -> None:
    """x_gates ends in (NH, 4, DH); R must be (NH, DH, 4, DH) and b (NH, 4, DH) to match."""
    if x_gates.dim() != gate_dims or x_gates.shape[-2] != 4:
        layout = "(B, S, NH, 4, DH)" if gate_dims == 5 else "(B, NH, 4, DH)"
        raise ValueError(f"slstm: x_gates must be {layout} with gates i, f, z, o; got {tuple(x_gates.shape)}")
    if not x_gates.is_floating_point():
        raise ValueError(f"slstm: x_gates must be a floating-point tensor, got {x_gates.dtype}")
    num_heads, head_dim = x_gates.shape[-3], x_gates.shape[-1]
    if tuple(R.shape) != (num_heads, head_dim, 4, head_dim):
        raise ValueError(
            f"slstm: R must be (NH, DH, 4, DH) = {(num_heads, head_dim, 4, head_dim)} for x_gates "
            f"{tuple(x_gates.shape)}; got {tuple(R.shape)}"
        )
    if tuple(b.shape) != (num_heads, 4, head_dim):
        raise ValueError(f"slstm: b must be (NH, 4, DH) = {(num_heads, 4, head_dim)}; got {tuple(b.shape)}")
    for name, tensor in (("R", R), ("b", b)):
        if tensor.device != x_gates.device:
            raise ValueError(f"slstm: {name} is on {tensor.device} but x_gates on {x_gates.device}")


def _check_state(state, batch: int, num_heads: int, head_dim: int, device: torch.device, name: str):
    if not isinstance(state, (tuple, list)) or len(state) != 4:
        raise ValueError(f"slstm: {name} must be a tuple (y, c, n, m) of 4 tensors, got {type(state).__name__}")
    for label, tensor in zip("ycnm", state):
        if tuple(tensor.shape) != (batch, num_heads, head_dim):
            raise ValueError(
                f"slstm: {name} {label} must be (B, NH, DH) = {(batch, num_heads, head_dim)}; got {tuple(tensor.shape)}"
            )
        if tensor.device != device:
            raise ValueError(f"slstm: {name} {label} is on {tensor.device} but x_gates on {device}")


def _zero_state(x_gates: torch.Tensor) -> tuple[torch.Tensor, ...]:
    batch, num_heads, head_dim = x_gates.shape[0], x_gates.shape[-3], x_gates.shape[-1]
    zeros = x_gates.new_zeros((batch, num_heads, head_dim), dtype=state_dtype(x_gates.dtype))
    return (zeros, zeros, zeros, zeros)


def _check_doc_ids(doc_ids: torch.Tensor, batch: int, seq_len: int, device: torch.device) -> None:
    if tuple(doc_ids.shape) != (batch, seq_len):
        raise ValueError(f"slstm: doc_ids must be (B, S) = {(batch, seq_len)}; got {tuple(doc_ids.shape)}")
    if doc_ids.is_floating_point() or doc_ids.is_complex() or doc_ids.dtype == torch.bool:
        raise ValueError(f"slstm: doc_ids must be an integer tensor, got {doc_ids.dtype}")
    if doc_ids.device != device:
        raise ValueError(f"slstm: doc_ids is on {doc_ids.device} but x_gates on {device}")


def slstm(
    x_gates: torch.Tensor,
    R: torch.Tensor,
    b: torch.Tensor,
    *,
    state0: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    doc_ids: torch.Tensor | None = None,
    return_state: bool = False,
    impl: str = "auto",
):
    """Run the sLSTM cell over a sequence.

    x_gates (B, S, NH, 4, DH), R (NH, DH, 4, DH), b (NH, 4, DH); state0 None (zeros) or (y, c, n, m)
    each (B, NH, DH); doc_ids (B, S) integer ids: token t starts from the zero state where the id
    changes between t-1 and t. impl: "auto" (the Triton kernels for CUDA tensors in bf16, fp16 or
    fp32 when triton imports, else the reference), "reference" or "triton" (on CPU it needs
    TRITON_INTERPRET=1 and small shapes).

    Returns y (B, S, NH, DH) in x_gates' dtype, or (y, (y_T, c_T, n_T, m_T)) with return_state=True
    (states in fp32, fp64 for fp64 inputs).
    """
    if impl not in IMPLS:
        raise ValueError(f"slstm: impl must be one of {IMPLS}, got {impl!r}")
    _check_weights(x_gates, R, b, gate_dims=5)
    batch, seq_len, num_heads, _, head_dim = x_gates.shape
    if seq_len == 0:
        raise ValueError("slstm: x_gates has an empty sequence dimension (S = 0)")
    if state0 is None:
        state0 = _zero_state(x_gates)
    else:
        _check_state(state0, batch, num_heads, head_dim, x_gates.device, "state0")
    starts = None
    if doc_ids is not None:
        _check_doc_ids(doc_ids, batch, seq_len, x_gates.device)
        starts = document_resets(doc_ids, batch, seq_len, x_gates.device)
    if impl == "auto":
        use_triton = slstm_triton is not None and x_gates.is_cuda and x_gates.dtype in TRITON_DTYPES
        impl = "triton" if use_triton else "reference"
    if impl == "triton":
        if slstm_triton is None:
            raise ValueError("slstm: impl='triton' needs the triton package, which does not import here")
        y, state = slstm_triton(x_gates, R, b, tuple(state0), starts)
    else:
        y, state = slstm_reference(x_gates, R, b, tuple(state0), starts)
    return (y, state) if return_state else y


def slstm_step(
    x_gates_t: torch.Tensor,
    R: torch.Tensor,
    b: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
):
    """One token for generation: x_gates_t (B, NH, 4, DH), state (y, c, n, m) each (B, NH, DH) or None.

    Returns (y_t (B, NH, DH) in x_gates_t's dtype, (y, c, n, m) in fp32).
    """
    _check_weights(x_gates_t, R, b, gate_dims=4)
    batch, num_heads, _, head_dim = x_gates_t.shape
    if state is None:
        state = _zero_state(x_gates_t)
    else:
        _check_state(state, batch, num_heads, head_dim, x_gates_t.device, "state")
    return slstm_step_reference(x_gates_t, R, b, tuple(state))
