"""Checkpoints in the formats other runtimes deploy: ``llmarch export``.

One module per format: ``hf`` (a Hugging Face directory for transformers, vLLM and llama.cpp's
converter). Each is imported on its own, so that one format's dependencies are not another's.
"""
