"""`make bench`: cost of the regulariser and of the metric suite (not shipped)."""
