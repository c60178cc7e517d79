"""Tagger packaging: the pretrained ImageNet tagger as a registered artifact (ONNX, int8, model card)."""
