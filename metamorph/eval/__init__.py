"""Evaluation of a VPiT model and its decoder: understanding, generation, benchmarks, the report.

    python -m metamorph.eval.judge      # trains the toy-world attribute judge and prints its accuracy

Library code only (no ray, no mlflow): ``stages/evaluate.py`` wires it into the pipeline and
``pipelines/infer.py`` reuses ``metamorph.eval.inference`` for the ``generate``/``chat`` commands.
"""
