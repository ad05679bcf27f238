"""The one 7-class expression order every reader maps to, and the names datasets use for each class.

The order is RAF-DB's basic-emotion order (label files count 1..7 in it), which POSTER++ and most FER code
bases use as their class index 0..6: surprise, fear, disgust, happiness, sadness, anger, neutral.
"""

from __future__ import annotations

EXPRESSIONS: tuple[str, ...] = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
NUM_CLASSES = len(EXPRESSIONS)
# How a sentence describes a face of each class, and the label prompt LA-CLIP's text side sees.
ADJECTIVES: tuple[str, ...] = ("surprised", "fearful", "disgusted", "happy", "sad", "angry", "neutral")
LABEL_PROMPT = "a photo of a {} face"

# Every spelling the supported layouts use (FER2013/FERPlus column names, KDEF codes, common folder names).
_SYNONYMS: dict[str, str] = {
    "surprised": "surprise", "su": "surprise",
    "afraid": "fear", "scared": "fear", "fearful": "fear", "af": "fear",
    "disgusted": "disgust", "di": "disgust",
    "happy": "happiness", "joy": "happiness", "ha": "happiness",
    "sad": "sadness", "sa": "sadness",
    "angry": "anger", "an": "anger",
    "calm": "neutral", "ne": "neutral",
}


def label_index(name: str) -> int:
    """Class index of an expression name in any spelling listed above (case-insensitive)."""
    key = name.strip().lower()
    key = _SYNONYMS.get(key, key)
    try:
        return EXPRESSIONS.index(key)
    except ValueError:
        known = ", ".join(EXPRESSIONS)
        raise ValueError(f"unknown expression label {name!r}; known: {known} (and common synonyms)") from None
