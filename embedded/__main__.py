"""`python -m embedded ...`: the embedded default, as `python train.py ...` runs it without --data."""

import errors
from embedded.command import main

if __name__ == "__main__":
    errors.run(main, "python -m embedded")
