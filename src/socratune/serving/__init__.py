"""Layer 4, using a trained run live: ``socratune serve``, an OpenAI-compatible chat API and a browser
chat page, and ``socratune chat`` in the terminal (``chat.py``).

    socratune serve runs/tiny                  # http://127.0.0.1:8000/ (page) and /v1 (API)
    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "tiny", "messages": [{"role": "user", "content": "幸福とは何でしょうか？"}]}'

Endpoints: ``POST /v1/chat/completions`` (plain JSON, or server-sent events with
``"stream": true``), ``GET /v1/models``, ``GET /health``, the page at ``/``
(``assets/chat.html``) and its icon at ``/favicon.ico``. ``HEAD`` works wherever ``GET`` does.

The HTTP side is uvicorn (h11) with Starlette, as vLLM's and LLaMA-Factory's APIs are: HTTP
parsing, keep-alive, streaming, CORS and a clean shutdown come from maintained code. What they
do not bound, this folder does (``schema.ServeLimits``): the body is counted as it is read and cut at
the limit, the whole body must arrive within a deadline, the JSON is checked for depth, lone
surrogates and out-of-range numbers before it reaches the model, and every refusal is OpenAI's
error object. Generation is blocking torch work: it runs in a thread of its own, one at a time
(``Engine.hold``), handing text to the event loop, which streams it; a client that hangs up
ends its generation at the next token and frees the model.

    schema.py   the request schema and the limits; ApiError, every refusal as OpenAI's error object
    engine.py   the model behind the API: a body parsed into a Completion, one generation at a time
    app.py      the ASGI app: routes, the guard (Host, API key, last word on failures), streaming
    server.py   uvicorn on a socket bound before the model loads; the deadline on request headers
    chat.py     the terminal chat
"""
