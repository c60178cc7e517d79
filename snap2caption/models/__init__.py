"""Models: image encoders (``backbones``), the ImageNet tagger (``tagger``), the caption model.

Kept free of imports so that ``import snap2caption.models`` stays cheap; import the submodules you need.
"""
