"""Everything that touches llama.cpp: the only package of the engine that imports llama_cpp.

The runner (load, warm-up, calibration, `execute(plan)`, free) and its adapters: the build
and the model's metadata, llama.cpp's log, the samplers, the CPU thread pools and the
tokenizer. The scheduler, the requests, the draft planner and the engine loop import none
of it, so they can be read and tested without llama-cpp-python.
"""
