"""`weightops doctor`: environment and native-kernel diagnostics (filled in by the kernels work)."""
