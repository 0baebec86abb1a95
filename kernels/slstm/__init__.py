"""The sLSTM cell: the recurrent reference and the fused Triton kernel."""
