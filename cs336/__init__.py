"""cs336: the whole stack in one command (``cs336 quickstart``)."""
