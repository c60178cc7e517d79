"""Models: one package per model, and the pieces they share beside them.

- :mod:`.caption`: the caption model (encoder -> mapping -> GPT-2), its runtimes and export;
- :mod:`.detector`: the YOLO object detector;
- :mod:`.tagger`: the ImageNet tagger.

Each package holds its model, its runtimes, its artifact reading and writing and its export, and loads the
same way: ``caption.load(folder_or_uri, runtime=...)``, ``detector.load(...)``, ``tagger.load(...)``, each
returning one small interface that the services, the evaluators and batch jobs call.

Shared: :mod:`.backbones` (image encoders: the caption model's and the tagger's), :mod:`.runtime` (the
runtime choice), :mod:`.onnx_io` (ONNX files' metadata and CPU sessions), :mod:`.onnx_export` (torch ->
ONNX, int8, TensorRT) and :mod:`.uri` (``models:/`` references).

Kept free of imports so that ``import snap2caption.models`` stays cheap; import the packages you need.
"""
