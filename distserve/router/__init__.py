"""The router: request front (gRPC + HTTP), routing policies, prefix index, instance registry."""
