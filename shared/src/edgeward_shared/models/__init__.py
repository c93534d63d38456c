"""The model supply chain's pure core: provenance, sealing, distribution metadata, ONNX checks."""
