"""Policies: the interface, features, baselines, the oracle and the ONNX runtime policy."""
