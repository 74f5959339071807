"""Model components: vision tower, projector, language model, speech. Pure torch/transformers/peft, no Ray."""
