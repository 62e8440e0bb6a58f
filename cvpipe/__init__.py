"""cvpipe: transfer learning and batch object detection as a reproducible pipeline."""
