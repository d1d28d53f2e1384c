"""Federated learning with NVIDIA FLARE: the components that fedfms jobs run on the server and the clients."""
