"""Model files: the registry of known GGUF builds, downloads, checks, and `--model` resolution.

The package imports none of its modules itself: the engine reads GGUF metadata
(`model_files.gguf`) where no download client is installed (the GPU check's machine), and
only `resolve` and `download` need huggingface_hub.
"""
