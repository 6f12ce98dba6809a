"""features methods (filled in by its issue)."""
__all__: list = []
