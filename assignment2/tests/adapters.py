from cs336_systems.adapters import *  # noqa: F401,F403  (the tests' API: see ../shared/spec/adapters.md)
