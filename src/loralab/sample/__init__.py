"""Image generation: A1111 prompt syntax, embeddings, wildcards, samplers, the generation engine,
PNG info, labelled grids and X/Y/Z plots.

The entry point for code is :class:`loralab.sample.generator.GenerationEngine` (render
``ImageRequest`` s on any checkpoint with LoRAs); ``request_plan`` turns settings with variants into
requests and ``xyz`` builds plots. Submodules are imported on use; this package imports nothing heavy.
"""
