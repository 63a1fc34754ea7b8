"""`weightops merge|inspect|diff|verify` (being written)."""
