"""The HTTP edge: the FastAPI app, API keys and their scopes, rate limits, body limits and the
uvicorn server with its connection guards.
"""
