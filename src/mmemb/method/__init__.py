"""The paper's stages, one module each, plain files in and out: candidate rationales from teachers,
counterfactual selection, GRPO on the think / no-think decision, and training the plug-in gate.
"""
