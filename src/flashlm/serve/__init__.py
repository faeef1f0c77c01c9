"""`flashlm serve`: an OpenAI-compatible HTTP server on `Engine.stream`.

    app.py        routes (chat and text completions, models, health), auth, error responses
    schema.py     strict parsing of OpenAI request bodies into `ParsedRequest`
    shapes.py     OpenAI response objects (completions, chunks, usage, the model entry)
    sse.py        a request's events as SSE `data:` payloads, ending in `[DONE]`
    runner.py     one admitted request on the engine, in its own task
    admission.py  the bounded queue in front of the engine
    server.py     the engine opened once, uvicorn on a bound socket, shutdown on SIGINT/SIGTERM
    cli.py        the `flashlm serve` command

Only `cli.py` is imported by `flashlm --help`; the rest loads when the server starts (it
needs the `serve` extra: starlette, uvicorn, sse-starlette).
"""
