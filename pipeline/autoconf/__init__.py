"""`python -m pipeline.autoconf --budget 20m`: a recipe chosen from the dataset and this machine
to fit a wall-time budget (see __main__.py; the rules are in rules.py)."""
