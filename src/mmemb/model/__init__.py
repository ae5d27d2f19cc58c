"""The inference core: a Qwen-VL backbone with the token protocol, decoding on a KV cache, and the
``Embedder`` that encodes items in direct / reason / auto mode (plus the plug-in gate's inference half).

Nothing here imports the training engine, the method's stages, evaluation, serving or the pipeline.
"""
