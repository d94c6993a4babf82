"""Generation (``generate``: KV cache, retrieval per chunk, sampling) and the Ray Serve app.

The app: ``app`` builds it (``build_app``, ``make_app``, ``serve_main``) from ``ingress`` (HTTP),
``generator`` and ``embedder_deployment`` (the deployments behind it); ``schemas`` says what a valid
request is, ``errors`` holds the one error type, ``config`` the settings.
"""
