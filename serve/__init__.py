"""ardeploy serve: an OpenAI-compatible HTTP server over the runtime, structured output, and Triton.

    scheduler.py   SequentialScheduler: one request at a time (the protocol of runtime/scheduling.py)
    engine.py      build_engine: the generator and scheduler a server runs (where a batching one plugs in)
    grammar.py     JSON / JSON-schema constraints through llguidance, masks from the bundle's tokenizer
    protocol.py    pydantic request models, OpenAI-style error wording
    service.py     API request -> scheduler Request; token events back onto the event loop
    app.py         the FastAPI routes, SSE, API key; metrics.py: Prometheus
    server.py      uvicorn with a graceful drain on SIGTERM
    triton.py      a Triton model repository (Python backend) running the same runtime

Imports the runtime only (never torch); its own packages come with `pip install 'ardeploy[serve]'`.
"""
