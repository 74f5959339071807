"""The synthetic "shapes" set: the embedded default's training and held-out data.

Each 224x224 RGB image shows one or two non-overlapping shapes (circle, square, triangle) in six saturated colours
on a plain light background. Questions come in six types, each asked in many wordings and answered in varied
wordings that always name exactly the expected colour, shape, number or objects. A fixed set of wordings per type
is held out: training conversations never use it and held-out images ask both sets, so evaluation can score seen
and held-out wordings apart.

- `vocabulary`: colours, shapes, question types, question and answer wordings, caption templates.
- `drawing`: sampling and placing the shapes, rendering, PNG bytes.
- `questions`: captions, question/answer pairs and their grouping into conversations.
- `samples`: one image of a split, deterministic in (seed, split, index).
- `dataset`: the set on disk (COCO captions, LLaVA-Instruct, the ground-truth meta file): write and read.
"""
