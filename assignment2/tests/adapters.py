from cs336_systems.adapters import *  # the tests' API: see ../shared/spec/adapters.md
