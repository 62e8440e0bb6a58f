"""Side-by-side benchmark of the pipeline against the seed's own loops (issue 6): ``python -m bench``."""
