from cs336_basics.adapters import *  # the tests' API: see ../shared/spec/adapters.md
