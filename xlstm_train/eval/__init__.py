"""Using a trained model: ``xlstm-train eval`` (loss, perplexity and bits per byte on held-out text,
lm-evaluation-harness tasks, synthetic-task accuracy) and ``xlstm-train generate``.

- ``loading``: (model, tokenizer, config) from any checkpoint, for both commands.
- ``perplexity``: documents scored in full (recurrent state for the xLSTMs, sliding windows for Llama).
- ``harness``: the ``lm_eval`` model class over our models (imported only when tasks are asked for).
- ``synthetic``: answer-position accuracy on the formal-language tasks and MQAR.
- ``training``: the evaluations a recipe's ``eval`` section runs every N steps.
- ``commands``: the two command lines.
"""
