"""A small labelled set of real photos for the tagger's ``test_top1``: the ones scikit-image ships.

ImageNet cannot be downloaded here, so the tagger's gate metric is measured on the photographs bundled in
the scikit-image wheel (no download: ``skimage.data`` reads them from the package). Only photos whose
subject has an unambiguous ImageNet class are used, and for each the accepted classes were fixed from what
the photo shows, before looking at any prediction:

- ``chelsea``: a tabby cat -> any domestic-cat class (281 tabby, 282 tiger cat, 283 Persian, 284 Siamese,
  285 Egyptian cat);
- ``coffee``: a cup of espresso on a saucer -> 967 espresso, 968 cup, 504 coffee mug;
- ``rocket``: a rocket on its launch pad -> 657 missile, 744 projectile/missile (ImageNet's rocket classes).

Left out because ImageNet has no class for their subject or the photo is not recognisable: astronaut
(a portrait), camera (a man with a camera), motorcycle (no motorcycle class besides moped / scooter),
clock_motion (a motion-blurred blob), coins, moon, horse (a silhouette), microscopy and texture images.

``test_top1`` = the share of these photos whose top-1 ImageNet class is among the accepted ones. With three
photos it moves in steps of 1/3: a smoke test that the weights, preprocessing and export are right, not an
ImageNet accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class LabelledPhoto:
    """One photo and the ImageNet classes accepted as a correct top-1.

    Attributes:
        name: The ``skimage.data`` function.
        subject: What the photo shows.
        accepted: ImageNet class indices that count as correct.
    """

    name: str
    subject: str
    accepted: frozenset[int]

    def image(self) -> Image.Image:
        """The photo as an RGB PIL image."""
        import skimage.data

        return Image.fromarray(getattr(skimage.data, self.name)()).convert("RGB")


PHOTOS: tuple[LabelledPhoto, ...] = (
    LabelledPhoto("chelsea", "tabby cat", frozenset(range(281, 286))),
    LabelledPhoto("coffee", "cup of espresso", frozenset({967, 968, 504})),
    LabelledPhoto("rocket", "rocket on a launch pad", frozenset({657, 744})),
)
# Unlabelled photos that only feed int8 calibration and the int8-vs-float top-5 agreement.
EXTRA_PHOTOS: tuple[str, ...] = (
    "astronaut", "camera", "coins", "moon", "horse", "hubble_deep_field",
    "immunohistochemistry", "retina", "page", "text", "brick", "grass", "gravel",
)  # fmt: skip


def extra_images() -> list[Image.Image]:
    """The unlabelled bundled photos (grey ones converted to RGB); any that need a download are skipped."""
    import skimage.data

    images = []
    for name in EXTRA_PHOTOS:
        try:
            images.append(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))
        except Exception:  # a photo missing from this wheel would need pooch and the network
            continue
    return images
