"""`fastgpt serve`: an OpenAI-compatible HTTP server with continuous batching.

engine.py   the batching loop: one background thread, one static KV cache whose rows are slots
protocol.py OpenAI request fields -> validated engine requests; response and error shapes
chat.py     chat messages -> one prompt through the model's stored template
app.py      the FastAPI app: routes, Bearer auth, body limit, streaming, disconnects
page.html   the browser chat page served at /
"""
