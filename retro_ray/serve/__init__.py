"""Generation (``generate``: KV cache, retrieval per chunk, sampling) and the Ray Serve app (``app``)."""
