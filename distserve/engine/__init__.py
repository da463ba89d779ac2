"""The engine: requests, sampling, KV block pool + prefix cache, schedulers, model runner, loop.

Importing this package imports no torch; the modules that need it import it themselves.
"""
