"""Model code: architectures, TP layers, rotary embeddings, weight loading, attention backends.

Importing this package imports no torch; import the submodules you need.
"""
