"""The detector service: image -> objects (YOLO boxes) and tags (ImageNet classes) over REST
(``snap2caption serve detector``, port 8002)."""
