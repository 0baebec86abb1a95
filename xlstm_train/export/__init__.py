"""Moving weights out of and into xlstm-train: ``convert`` (weight and config mapping to the official
``xlstm`` package and transformers, Hub import) and ``hf`` (``xlstm-train export-hf``)."""
