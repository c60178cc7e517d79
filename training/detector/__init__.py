"""Detector training (Ultralytics YOLO, offline), evaluation (pycocotools), export (ONNX, int8, TensorRT)."""
