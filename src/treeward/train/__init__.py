"""Small, readable training loops for the shipped models."""
