"""The ServerApp: round loop, update screening, metrics history and encrypted model files."""
