"""Instances: an engine wrapped as a prefill, decode or colocated gRPC service."""
