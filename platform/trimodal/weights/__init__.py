"""Model weights: resolving a `ModelSource` to a local directory (`sources`) and converting the packaged ones
(`whisper_ct2`). Below `trimodal.models`: it imports no model code."""
