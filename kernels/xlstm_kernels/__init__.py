"""xlstm_kernels: mLSTM and sLSTM cells as functions.

Each cell has pure-PyTorch references (fp64-exact oracles, autograd, CPU and GPU) and Triton
kernels, behind one functional API that dispatches by ``impl``: ``"reference"``, ``"triton"`` or
``"auto"`` (Triton on CUDA tensors, the reference elsewhere). Autograd lives in
``torch.autograd.Function``s next to the kernels. This package imports only torch and triton.
"""

from xlstm_kernels.mlstm import mlstm, mlstm_step
from xlstm_kernels.slstm import slstm

__all__ = ["mlstm", "mlstm_step", "slstm"]
