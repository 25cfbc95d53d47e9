"""`tpmax serve`: the OpenAI-compatible HTTP server over one engine thread.
"""
