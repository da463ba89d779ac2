"""gRPC plumbing shared by the router, the instances and the client SDK (no request logic)."""
