"""The HTTP front: an OpenAI-compatible API served by gunicorn, reaching rank 0 over IPC.

`protocol` (request validation, response objects) -> `app` (serving and routes), with every
error typed in `errors`.  Nothing here imports torch: the front holds no model.
"""
