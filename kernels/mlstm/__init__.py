"""The mLSTM cell: references (recurrent, parallel, chunkwise) and Triton kernels."""
