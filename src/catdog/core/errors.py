class CatdogError(Exception):
    """An error the user can fix; stage CLIs print it as one line and exit non-zero."""
