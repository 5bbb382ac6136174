from cs336_alignment.adapters import *  # noqa: F401,F403  (the tests' API: see ../shared/spec/adapters.md)
