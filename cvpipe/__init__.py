"""cvpipe: transfer learning and batch object detection as a reproducible pipeline."""

STAGES = ("download", "preprocess", "train", "evaluate", "detect")
MODES = ("feature_extractor", "fine_tune")
