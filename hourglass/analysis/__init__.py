"""Understanding spans: trace frames, repair, critical path, detectors, what-if savings, ranking, write-up."""
