"""Training library for the LLM stages: config, resumable reader, LR schedule, checkpoints, loop.

    python -m pytest tests/unit/test_train_loop.py -q

Never imports ray or mlflow: stages/_training.py runs `train_loop` inside Ray Train workers.
"""
