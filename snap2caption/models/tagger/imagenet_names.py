"""ImageNet-1k class labels and the plain words a social post would use for them.

ImageNet names 1000 fine-grained synsets ("tabby, tabby cat", "Staffordshire bullterrier, ...", "espresso"); a
post wants "cat", "dog", "coffee". :func:`readable_name` maps a class to that word in three steps:

1. ``_OVERRIDES``: one class -> one word, for classes whose first synonym is not what people say
   ("hog, pig, grunter ..." -> "pig", "Granny Smith" -> "apple", "espresso" -> "coffee").
2. ``_FAMILIES``: inclusive index ranges that share one word (dogs 151-268, cats 281-285, snakes 52-68, ...).
3. Otherwise the label's first synonym made readable: lowercase, ``_`` and ``-`` become spaces.

Indices follow the standard ImageNet-1k order (sorted WordNet ids), the order of timm's ``ImageNetInfo`` and
of torchvision's ``IMAGENET1K`` metadata.
"""

from __future__ import annotations

import re
from functools import lru_cache

NUM_IMAGENET_CLASSES = 1000

# (first, last, word): inclusive ranges of ImageNet-1k indices that share one plain word.
_FAMILIES: tuple[tuple[int, int, str], ...] = (
    (0, 1, "fish"),  # tench, goldfish
    (2, 4, "shark"),
    (5, 6, "ray"),  # electric ray, stingray
    (7, 8, "chicken"),  # cock, hen
    (10, 24, "bird"),  # finches, robin, jay, magpie, kite, eagle, vulture, owl
    (25, 29, "salamander"),  # salamanders, newt, eft, axolotl
    (30, 32, "frog"),
    (33, 37, "turtle"),
    (38, 48, "lizard"),  # gecko, iguana, chameleons, Komodo dragon
    (49, 50, "crocodile"),  # crocodile, alligator
    (52, 68, "snake"),
    (72, 77, "spider"),
    (80, 100, "bird"),  # grouse, quail, parrots, hornbill, hummingbird, toucan, ducks, goose, swan
    (118, 121, "crab"),
    (122, 124, "lobster"),  # lobsters, crayfish
    (127, 146, "bird"),  # storks, flamingo, herons, shore birds, pelican, penguin, albatross
    (147, 148, "whale"),
    (151, 268, "dog"),  # every dog breed
    (269, 271, "wolf"),
    (277, 280, "fox"),
    (281, 285, "cat"),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    (294, 297, "bear"),
    (300, 307, "beetle"),  # beetles, ladybug, weevil
    (321, 326, "butterfly"),
    (330, 332, "rabbit"),
    (370, 382, "monkey"),
    (383, 384, "lemur"),
    (385, 386, "elephant"),
    (389, 397, "fish"),
    (991, 997, "mushroom"),  # fungi
)

# One class -> one word, applied before the families (so "eagle" wins over "bird").
_OVERRIDES: dict[int, str] = {
    # animals
    9: "ostrich",
    22: "eagle",
    24: "owl",
    84: "peacock",
    87: "parrot",
    88: "parrot",
    89: "parrot",
    90: "parrot",
    97: "duck",
    98: "duck",
    99: "goose",
    100: "swan",
    101: "elephant",
    109: "coral",
    117: "nautilus",
    125: "crab",
    130: "flamingo",
    144: "pelican",
    145: "penguin",
    148: "orca",
    334: "porcupine",
    335: "squirrel",
    339: "horse",
    341: "pig",
    345: "cow",
    348: "sheep",
    349: "sheep",
    350: "goat",
    354: "camel",
    359: "ferret",
    364: "sloth",
    387: "red panda",
    388: "panda",
    390: "eel",
    391: "salmon",
    393: "clownfish",
    397: "pufferfish",
    # vehicles
    403: "ship",
    404: "airplane",
    436: "car",
    444: "bicycle",
    466: "train",
    468: "taxi",
    484: "boat",
    510: "ship",
    511: "car",
    547: "train",
    554: "boat",
    555: "fire truck",
    565: "train",
    569: "truck",
    609: "jeep",
    625: "boat",
    627: "car",
    628: "ship",
    654: "bus",
    656: "car",
    661: "car",
    665: "moped",
    670: "scooter",
    671: "bicycle",
    675: "truck",
    705: "train",
    717: "truck",
    724: "ship",
    734: "van",
    751: "race car",
    779: "bus",
    780: "sailboat",
    814: "boat",
    817: "car",
    820: "train",
    829: "tram",
    864: "truck",
    867: "truck",
    871: "boat",
    874: "bus",
    895: "airplane",
    908: "airplane",
    914: "sailboat",
    # things
    402: "guitar",
    409: "clock",
    412: "trash can",
    418: "pen",
    437: "lighthouse",
    440: "beer",
    441: "beer",
    453: "bookshelf",
    459: "bra",
    480: "atm",
    487: "phone",
    504: "mug",
    508: "keyboard",
    527: "computer",
    528: "phone",
    530: "clock",
    531: "watch",
    532: "table",
    546: "guitar",
    550: "coffee maker",
    559: "chair",
    563: "pen",
    579: "piano",
    608: "jeans",
    610: "t-shirt",
    630: "shoe",
    673: "computer mouse",
    681: "laptop",
    707: "phone",
    737: "bottle",
    738: "flowerpot",
    760: "fridge",
    761: "remote",
    765: "chair",
    770: "shoe",
    836: "sunglasses",
    850: "teddy bear",
    851: "tv",
    881: "piano",
    892: "clock",
    897: "washing machine",
    898: "bottle",
    907: "wine",
    916: "website",
    # food
    929: "popsicle",
    930: "bread",
    933: "burger",
    934: "hot dog",
    936: "cabbage",
    947: "mushroom",
    948: "apple",
    959: "pasta",
    963: "pizza",
    966: "wine",
    967: "coffee",
    # places, people, plants
    970: "mountains",
    975: "lake",
    977: "beach",
    978: "beach",
    981: "baseball",
    982: "wedding",
    983: "scuba diving",
    984: "flowers",
    985: "flower",
    986: "flower",
    998: "wheat",
    999: "toilet paper",
}


def readable_label(label: str) -> str:
    """The first synonym of a class label, lowercase, with ``_`` and ``-`` turned into spaces.

    Args:
        label: a class label, e.g. ``"great white shark, white shark, man-eater"``.

    Returns:
        e.g. ``"great white shark"``; ``"pay-phone, pay-station"`` -> ``"pay phone"``.
    """
    first = label.split(",")[0]
    return " ".join(re.sub(r"[_\-]+", " ", first).lower().split())


def readable_name(index: int, label: str) -> str:
    """The plain word for ImageNet-1k class ``index`` (see the module docstring for the rules).

    Args:
        index: class index in the standard ImageNet-1k order.
        label: the class label, used when no table entry covers ``index``.

    Returns:
        e.g. ``readable_name(281, "tabby, tabby cat") == "cat"``.
    """
    if index in _OVERRIDES:
        return _OVERRIDES[index]
    for first, last, word in _FAMILIES:
        if first <= index <= last:
            return word
    return readable_label(label)


def hashtag(name: str) -> str:
    """``#`` + the name's lowercase letters and digits only: ``"teddy bear"`` -> ``#teddybear``."""
    return "#" + re.sub(r"[^0-9a-z]", "", name.lower())


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k labels (``"tabby, tabby cat"``), from timm's offline metadata (no download)."""
    from timm.data import ImageNetInfo  # heavy import, only when labels are needed

    info = ImageNetInfo()
    labels = tuple(info.index_to_description(i) for i in range(info.num_classes()))
    if len(labels) != NUM_IMAGENET_CLASSES:
        raise RuntimeError(f"timm's ImageNetInfo has {len(labels)} classes, expected {NUM_IMAGENET_CLASSES}")
    return labels


def imagenet_names() -> tuple[str, ...]:
    """The readable word for each of the 1000 ImageNet-1k classes, in class order."""
    return tuple(readable_name(i, label) for i, label in enumerate(imagenet_labels()))
