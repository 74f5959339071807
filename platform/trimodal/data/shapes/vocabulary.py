"""The shapes set's words: colours, shapes, question types, the question wordings of each type in a seen and a
held-out set, the answer wordings and the caption templates."""

from __future__ import annotations

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (20, 160, 40),
    "blue": (20, 60, 220),
    "yellow": (240, 210, 0),
    "purple": (130, 30, 170),
    "orange": (255, 130, 0),
}
"""Colour name -> the RGB it is drawn in."""
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "describe", "exists", "side")
PHRASING_SETS: tuple[str, ...] = ("seen", "held_out")
"""Training asks the seen wordings only; held-out images ask both, so evaluation can score them apart."""
PHRASINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "color": {
        "seen": ("What color is {thing}?", "What colour is {thing}?", "Which color is {thing}?",
                 "What is the color of {thing}?", "Tell me the colour of {thing}.", "Color of {thing}?",
                 "What color is it?", "Could you tell me what color {thing} in this image is?",
                 "In which colour is {thing} drawn?"),
        "held_out": ("Which color does {thing} have?", "Name the colour of {thing}.",
                     "Identify the color of {thing}."),
    },
    "shape": {
        "seen": ("What shape is {thing}?", "Which shape is {thing}?", "What kind of shape is {thing}?",
                 "What is the shape of {thing}?", "Tell me the shape of {thing}.", "Shape of {thing}?",
                 "What shape is it?", "Could you tell me what shape {thing} in this image has?",
                 "What form does {thing} have?"),
        "held_out": ("Which kind of shape is {thing}?", "Name the shape of {thing}.", "Identify the shape of {thing}."),
    },
    "count": {
        "seen": ("How many shapes are there?", "How many objects are there?", "How many shapes are in the image?",
                 "How many objects can you see?", "Count the shapes.", "What is the number of shapes?",
                 "Tell me how many shapes there are.", "How many shapes does the picture show?",
                 "Number of shapes?"),
        "held_out": ("How many things are drawn?", "Count the objects in the picture.",
                     "Identify the number of shapes."),
    },
    "describe": {
        "seen": ("Describe the image.", "Describe the picture.", "What is in the image?", "What do you see?",
                 "Tell me what the image shows.", "What does the picture show?", "Describe what you see.",
                 "List the shapes in the image.", "Give a short description of the image."),
        "held_out": ("What is shown in this picture?", "Name the objects in the image.",
                     "Identify everything in the picture."),
    },
    "exists": {
        "seen": ("Is there {item}?", "Is there {item} in the image?", "Do you see {item}?", "Can you see {item}?",
                 "Does the image contain {item}?", "Does the picture show {item}?", "Is {item} shown?",
                 "Tell me if there is {item}.", "Could you check whether the image has {item} in it?"),
        "held_out": ("Is {item} visible?", "Does this picture have {item}?", "Is {item} present in the picture?"),
    },
    "side": {
        "seen": ("What color is the shape on the {side}?", "What colour is the object on the {side}?",
                 "Which color is the {side} shape?", "What is the color of the {side} object?",
                 "Tell me the colour of the shape on the {side}.", "What color is the {side} one?",
                 "What color is the {side}most shape?", "Could you tell me what colour the shape on the {side} is?",
                 "The shape on the {side}: what color is it?"),
        "held_out": ("Which color does the {side} shape have?", "Name the colour of the object on the {side}.",
                     "Identify the color of the shape on the {side} side."),
    },
}
"""Question wordings per type and phrasing set. {thing}: the object asked about ('the circle'; in a one-object image
also 'the shape' or 'the object'; for `shape`, 'the red object' / 'the red shape' / 'the red one'); a colour or shape
wording without {thing} ('What color is it?') is asked about one-object images only. {item}: 'a red circle'.
{side}: left or right. The first seen wording of color, shape, count and describe is the form DESIGN.md gives
("What color is the {shape}?", ...)."""
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": ("{Thing} is {color}.", "It is {color}.", "It's {color}.", "{Color}.", "The color is {color}.",
              "{Thing} is colored {color}."),
    "shape": ("It is a {shape}.", "It's a {shape}.", "{Thing} is a {shape}.", "A {shape}.", "That is a {shape}."),
    "count": ("There {is} {n} {shapes}.", "There {is} {n} {objects}.", "{N}.", "I can see {n} {shapes}.",
              "The image shows {n} {shapes}."),
    "describe": ("{Caption}.", "The image shows {caption}.", "I see {caption}.", "It shows {caption}.",
                 "This is a picture of {caption}."),
    "side": ("The {side} shape is {color}.", "It is {color}.", "{Color}.", "The shape on the {side} is {color}.",
             "The {side} one is {color}.", "It is the {color} {shape}."),
}
"""Answer wordings; each names the expected colour, shape or number and no other. `exists` answers have one form
(`questions.exists_answer`)."""
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{} on a light background",
    "{} on a plain background",
    "a simple drawing of {}",
    "a picture of {}",
    "an image showing {}",
)
"""Paraphrases of the canonical caption ('a red circle'), which fills {}."""
