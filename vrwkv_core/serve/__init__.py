"""`vrwkv serve`: an OpenAI-compatible vision chat server with continuous batching and a state cache.

    from vrwkv_core.serve.server import serve
    serve("out/tiny/finetune", port=8000)
"""
