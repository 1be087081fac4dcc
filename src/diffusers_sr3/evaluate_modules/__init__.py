"""Hugging Face `evaluate` modules shipped with the package (loaded by path, so they work offline).

`evaluate.load(diffusers_sr3.metrics.evaluate_module_path())` loads `sr3_metrics.py` from this folder.
"""
