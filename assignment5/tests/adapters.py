from cs336_alignment.adapters import *  # the tests' API: see ../shared/spec/adapters.md
